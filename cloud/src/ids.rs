//! Opaque object ids and secrets: random, prefixed by kind (`gw_…`, `tn_…`), so ids cannot be
//! guessed or enumerated and a pasted id says what it is.

use rand::RngCore;
use sha2::{Digest, Sha256};

/// A new id: `prefix` and 16 random bytes in lowercase hex.
pub fn new_id(prefix: &str) -> String {
    format!("{prefix}_{}", random_hex(16))
}

/// `bytes` random bytes from the OS generator, in hex.
pub fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    rand::rng().fill_bytes(&mut buf);
    hex::encode(buf)
}

/// SHA-256 of a high-entropy secret (session tokens, API keys, enrollment tokens), in hex.
/// These secrets carry 256 random bits, so a fast hash is enough; passwords use argon2id.
pub fn secret_hash(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_prefixed_and_distinct() {
        let a = new_id("gw");
        let b = new_id("gw");
        assert!(a.starts_with("gw_") && a.len() == 3 + 32);
        assert_ne!(a, b);
    }
}
