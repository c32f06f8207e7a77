//! Certificates: a CA per tenant that signs its gateways' client certificates, and the
//! service's own TLS server certificate (loaded from files, or a local CA made on first start).
//!
//! A gateway is recognised by the SHA-256 fingerprint of the exact certificate it was issued
//! (the `gateway_certs` table), so revoking one is a row update that takes effect on the next
//! request, with no CRL to distribute.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

/// A new CA for one tenant's gateways: (certificate PEM, private key PEM).
pub fn new_tenant_ca(tenant_name: &str) -> anyhow::Result<(String, String)> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    params.distinguished_name = name(&format!("Fieldgate gateway CA for tenant {tenant_name}"));
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = OffsetDateTime::now_utc();
    params.not_before = now - Duration::from_secs(3600);
    params.not_after = now + Duration::from_secs(20 * 365 * 86400);
    params.serial_number = Some(random_serial());
    let cert = params.self_signed(&key)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// A certificate issued to a gateway.
#[derive(Clone, Debug)]
pub struct IssuedCert {
    pub pem: String,
    pub fingerprint: String,
    pub serial: String,
    pub not_before_ms: i64,
    pub not_after_ms: i64,
}

/// Sign a gateway's certificate signing request with its tenant's CA. The request proves the
/// gateway holds the private key; everything else in it (names, extensions) is replaced: the
/// certificate names the gateway by id and is good for client authentication only.
pub fn sign_gateway_csr(
    ca_cert_pem: &str,
    ca_key_pem: &str,
    csr_pem: &str,
    gateway_id: &str,
    validity: Duration,
) -> anyhow::Result<IssuedCert> {
    let mut csr = CertificateSigningRequestParams::from_pem(csr_pem)
        .map_err(|e| anyhow::anyhow!("the certificate signing request is not valid: {e}"))?;
    let ca_key = KeyPair::from_pem(ca_key_pem).context("loading the tenant CA key")?;
    let issuer = Issuer::from_ca_cert_pem(ca_cert_pem, ca_key).context("loading the tenant CA")?;
    let now = OffsetDateTime::now_utc();
    let not_before = now - Duration::from_secs(300);
    let not_after = now + validity;
    let serial = random_serial();
    let params = &mut csr.params;
    params.distinguished_name = name(gateway_id);
    params.subject_alt_names = vec![SanType::URI(
        format!("urn:fieldgate:gateway:{gateway_id}").try_into()?,
    )];
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.not_before = not_before;
    params.not_after = not_after;
    params.serial_number = Some(serial.clone());
    params.use_authority_key_identifier_extension = true;
    params.custom_extensions.clear();
    let cert = csr.signed_by(&issuer)?;
    Ok(IssuedCert {
        pem: cert.pem(),
        fingerprint: fingerprint(cert.der()),
        serial: hex::encode(serial.to_bytes()),
        not_before_ms: (not_before.unix_timestamp_nanos() / 1_000_000) as i64,
        not_after_ms: (not_after.unix_timestamp_nanos() / 1_000_000) as i64,
    })
}

/// A new key pair and a certificate signing request for it: what a gateway sends to enroll
/// or renew. Returns (private key PEM, CSR PEM).
pub fn new_key_and_csr(common_name: &str) -> anyhow::Result<(String, String)> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    params.distinguished_name = name(common_name);
    let csr = params.serialize_request(&key)?;
    Ok((key.serialize_pem(), csr.pem()?))
}

/// SHA-256 of a DER certificate, in hex: how the cloud knows a gateway certificate.
pub fn fingerprint(der: &[u8]) -> String {
    hex::encode(Sha256::digest(der))
}

fn name(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn.push(DnType::OrganizationName, "Fieldgate");
    dn
}

fn random_serial() -> SerialNumber {
    use rand::RngCore;
    let mut bytes = [0u8; 16];
    rand::rng().fill_bytes(&mut bytes);
    bytes[0] &= 0x7f; // positive
    SerialNumber::from_slice(&bytes)
}

/// The files of the service's TLS identity.
#[derive(Clone, Debug)]
pub struct ServerIdentity {
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
    /// The CA clients should trust: the local CA's certificate when the service made its own.
    pub ca_path: Option<PathBuf>,
}

/// Make a local CA and a server certificate for `names` under `dir` (once: an existing set is
/// reused). For deployments without a certificate of their own; gateways and tools are given
/// `ca.pem` to trust.
pub fn ensure_local_server_identity(
    dir: &Path,
    names: &[String],
) -> anyhow::Result<ServerIdentity> {
    let identity = ServerIdentity {
        cert_path: dir.join("server.pem"),
        key_path: dir.join("server.key"),
        ca_path: Some(dir.join("ca.pem")),
    };
    if identity.cert_path.exists() && identity.key_path.exists() {
        return Ok(identity);
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::default();
    ca_params.distinguished_name = name("Fieldgate local service CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let now = OffsetDateTime::now_utc();
    ca_params.not_before = now - Duration::from_secs(3600);
    ca_params.not_after = now + Duration::from_secs(10 * 365 * 86400);
    ca_params.serial_number = Some(random_serial());
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca_params, ca_key);

    let server_key = KeyPair::generate()?;
    let mut params = CertificateParams::new(names.to_vec())?;
    params.distinguished_name = name(names.first().map(String::as_str).unwrap_or("fieldgate"));
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.not_before = now - Duration::from_secs(3600);
    params.not_after = now + Duration::from_secs(2 * 365 * 86400);
    params.serial_number = Some(random_serial());
    let server_cert = params.signed_by(&server_key, &issuer)?;

    write_private(&identity.key_path, server_key.serialize_pem().as_bytes())?;
    std::fs::write(&identity.cert_path, server_cert.pem())?;
    std::fs::write(identity.ca_path.as_ref().expect("set above"), ca_cert.pem())?;
    Ok(identity)
}

/// Write a file only its owner can read (keys).
pub fn write_private(path: &Path, contents: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    file.write_all(contents)?;
    file.sync_all()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gateway_csr_is_signed_as_a_client_certificate_of_the_tenant_ca() {
        let (ca_pem, ca_key) = new_tenant_ca("acme").unwrap();
        let (_key, csr) = new_key_and_csr("whatever-the-gateway-claims").unwrap();
        let issued =
            sign_gateway_csr(&ca_pem, &ca_key, &csr, "gw_123", Duration::from_secs(86400)).unwrap();
        let der = rustls_pemfile::certs(&mut issued.pem.as_bytes())
            .next()
            .unwrap()
            .unwrap();
        assert_eq!(issued.fingerprint, fingerprint(&der));
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        let cn = cert
            .subject()
            .iter_common_name()
            .next()
            .unwrap()
            .as_str()
            .unwrap();
        assert_eq!(cn, "gw_123", "the gateway's claimed name is replaced");
        let ca_der = rustls_pemfile::certs(&mut ca_pem.as_bytes())
            .next()
            .unwrap()
            .unwrap();
        let (_, ca) = x509_parser::parse_x509_certificate(&ca_der).unwrap();
        cert.verify_signature(Some(ca.public_key())).unwrap();
        assert!(issued.not_after_ms - issued.not_before_ms >= 86_400_000);
    }

    #[test]
    fn a_damaged_csr_is_refused() {
        let (ca_pem, ca_key) = new_tenant_ca("acme").unwrap();
        let (_key, csr) = new_key_and_csr("gw").unwrap();
        // Change one base64 character in the middle of the request: the signature no longer fits.
        let mut damaged = csr.clone().into_bytes();
        let at = damaged.len() / 2;
        damaged[at] = if damaged[at] == b'A' { b'B' } else { b'A' };
        let damaged = String::from_utf8(damaged).unwrap();
        assert!(
            sign_gateway_csr(&ca_pem, &ca_key, &damaged, "gw_1", Duration::from_secs(60)).is_err()
        );
        assert!(
            sign_gateway_csr(&ca_pem, &ca_key, "not pem", "gw_1", Duration::from_secs(60)).is_err()
        );
    }
}
