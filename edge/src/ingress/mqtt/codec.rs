//! MQTT 3.1.1 and 5 packets as the broker side of a device connection needs them: decoding what
//! devices send, encoding what the gateway answers. Sans-IO: bytes in, packets out; a decoded
//! packet borrows its topic, payload and strings from the receive buffer, so a PUBLISH costs no
//! allocation.
//!
//! Only what the ingress uses is encoded (CONNACK, PUBACK, SUBACK, UNSUBACK, PINGRESP,
//! DISCONNECT, and QoS 0 PUBLISH towards a device). Every packet a client may send is decoded
//! and checked against the specification's "MUST" rules that matter for safety (reserved flags,
//! lengths, UTF-8, packet identifiers); anything else is a [`DecodeError`], never a panic.

use std::fmt;

/// Which MQTT the client speaks, from its CONNECT.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Version {
    /// MQTT 3.1.1 (protocol level 4).
    V311,
    /// MQTT 5 (protocol level 5).
    V5,
}

/// MQTT 5 reason codes the ingress sends. MQTT 3.1.1 has no reason codes except in CONNACK and
/// SUBACK; [`encode_connack`] and [`encode_suback`] map them to the 3.1.1 return codes.
pub mod reason {
    pub const SUCCESS: u8 = 0x00;
    pub const GRANTED_QOS_0: u8 = 0x00;
    pub const UNSPECIFIED_ERROR: u8 = 0x80;
    pub const MALFORMED_PACKET: u8 = 0x81;
    pub const PROTOCOL_ERROR: u8 = 0x82;
    pub const UNSUPPORTED_PROTOCOL_VERSION: u8 = 0x84;
    pub const CLIENT_IDENTIFIER_NOT_VALID: u8 = 0x85;
    pub const BAD_USER_NAME_OR_PASSWORD: u8 = 0x86;
    pub const NOT_AUTHORIZED: u8 = 0x87;
    pub const SERVER_UNAVAILABLE: u8 = 0x88;
    pub const SERVER_BUSY: u8 = 0x89;
    pub const SERVER_SHUTTING_DOWN: u8 = 0x8B;
    pub const BAD_AUTHENTICATION_METHOD: u8 = 0x8C;
    pub const KEEP_ALIVE_TIMEOUT: u8 = 0x8D;
    pub const SESSION_TAKEN_OVER: u8 = 0x8E;
    pub const TOPIC_FILTER_INVALID: u8 = 0x8F;
    pub const TOPIC_NAME_INVALID: u8 = 0x90;
    pub const TOPIC_ALIAS_INVALID: u8 = 0x94;
    pub const PACKET_TOO_LARGE: u8 = 0x95;
    pub const QUOTA_EXCEEDED: u8 = 0x97;
    pub const PAYLOAD_FORMAT_INVALID: u8 = 0x99;
    pub const QOS_NOT_SUPPORTED: u8 = 0x9B;
}

/// Why bytes from a client are not a valid packet. The connection is closed after any of these.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The bytes break the packet format.
    #[error("malformed packet: {0}")]
    Malformed(&'static str),
    /// A well-formed packet the client may not send here.
    #[error("protocol error: {0}")]
    Protocol(&'static str),
    /// A CONNECT for a protocol level other than 4 (3.1.1) or 5.
    #[error("unsupported MQTT protocol level {0}")]
    UnsupportedVersion(u8),
    /// The packet's declared length is over the limit. Returned as soon as the fixed header is
    /// in, before the body is buffered.
    #[error("packet of {} bytes is over the limit", .0.frame_len())]
    TooLarge(FrameHeader),
}

/// The fixed header: packet type, flags and the length of the rest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    pub packet_type: u8,
    pub flags: u8,
    /// Bytes of the fixed header itself (2 to 5).
    pub header_len: usize,
    pub remaining_len: usize,
}

impl FrameHeader {
    pub fn frame_len(&self) -> usize {
        self.header_len + self.remaining_len
    }
}

pub const CONNECT: u8 = 1;
pub const CONNACK: u8 = 2;
pub const PUBLISH: u8 = 3;
pub const PUBACK: u8 = 4;
pub const PUBREC: u8 = 5;
pub const PUBREL: u8 = 6;
pub const PUBCOMP: u8 = 7;
pub const SUBSCRIBE: u8 = 8;
pub const SUBACK: u8 = 9;
pub const UNSUBSCRIBE: u8 = 10;
pub const UNSUBACK: u8 = 11;
pub const PINGREQ: u8 = 12;
pub const PINGRESP: u8 = 13;
pub const DISCONNECT: u8 = 14;
pub const AUTH: u8 = 15;

/// Parses the fixed header at the start of `buf`; `Ok(None)` when more bytes are needed.
pub fn parse_frame_header(buf: &[u8]) -> Result<Option<FrameHeader>, DecodeError> {
    let Some(&byte1) = buf.first() else {
        return Ok(None);
    };
    let mut remaining_len = 0usize;
    for i in 1..=4 {
        let Some(&byte) = buf.get(i) else {
            return Ok(None);
        };
        remaining_len |= usize::from(byte & 0x7f) << (7 * (i - 1));
        if byte & 0x80 == 0 {
            return Ok(Some(FrameHeader {
                packet_type: byte1 >> 4,
                flags: byte1 & 0x0f,
                header_len: i + 1,
                remaining_len,
            }));
        }
    }
    Err(DecodeError::Malformed(
        "remaining length longer than 4 bytes",
    ))
}

/// A client's CONNECT.
#[derive(Clone, PartialEq, Eq)]
pub struct Connect<'a> {
    pub version: Version,
    pub client_id: &'a str,
    pub clean_start: bool,
    /// Seconds; 0 turns keep-alive off.
    pub keep_alive: u16,
    pub username: Option<&'a str>,
    pub password: Option<&'a [u8]>,
    pub will: Option<Will<'a>>,
    /// MQTT 5: seconds the session outlives the connection (0: it ends with it; 3.1.1 has no
    /// such property and always reports 0).
    pub session_expiry_interval: u32,
    /// MQTT 5: largest packet the client accepts.
    pub maximum_packet_size: Option<u32>,
    /// MQTT 5: whether the client wants reason strings (default yes).
    pub request_problem_information: bool,
    /// MQTT 5 enhanced authentication, which the ingress does not offer.
    pub authentication_method: Option<&'a str>,
}

impl fmt::Debug for Connect<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connect")
            .field("version", &self.version)
            .field("client_id", &self.client_id)
            .field("clean_start", &self.clean_start)
            .field("keep_alive", &self.keep_alive)
            .field("username", &self.username)
            .field("password", &self.password.map(|_| "<redacted>"))
            .field("will", &self.will)
            .field("maximum_packet_size", &self.maximum_packet_size)
            .finish_non_exhaustive()
    }
}

/// The message a client asks the server to publish if it vanishes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Will<'a> {
    pub topic: &'a str,
    pub payload: &'a [u8],
    pub qos: u8,
    pub retain: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Publish<'a> {
    pub qos: u8,
    pub dup: bool,
    pub retain: bool,
    pub topic: &'a str,
    /// 0 for QoS 0.
    pub pkid: u16,
    /// MQTT 5 topic alias, which the ingress does not allow (it advertises none).
    pub topic_alias: Option<u16>,
    pub payload: &'a [u8],
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubscribeFilter<'a> {
    pub filter: &'a str,
    /// The maximum QoS the client asks for.
    pub qos: u8,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Subscribe<'a> {
    pub pkid: u16,
    pub filters: Vec<SubscribeFilter<'a>>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unsubscribe<'a> {
    pub pkid: u16,
    pub filters: Vec<&'a str>,
}

/// A packet from a client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Packet<'a> {
    Connect(Connect<'a>),
    Publish(Publish<'a>),
    PubAck {
        pkid: u16,
    },
    PubRec {
        pkid: u16,
    },
    PubRel {
        pkid: u16,
    },
    PubComp {
        pkid: u16,
    },
    Subscribe(Subscribe<'a>),
    Unsubscribe(Unsubscribe<'a>),
    PingReq,
    /// MQTT 5 carries a reason; 3.1.1's is always 0 (normal disconnection).
    Disconnect {
        reason: u8,
    },
    Auth,
}

/// Decodes one packet from the start of `buf`.
///
/// `version` is `None` until the CONNECT is in: then only a CONNECT is accepted. Returns
/// `Ok(None)` while the packet is incomplete, else the packet and its length in bytes.
/// A packet longer than `max_packet_len` bytes (fixed header included) is refused with
/// [`DecodeError::TooLarge`] as soon as its fixed header is in.
pub fn decode(
    buf: &[u8],
    version: Option<Version>,
    max_packet_len: usize,
) -> Result<Option<(Packet<'_>, usize)>, DecodeError> {
    let Some(header) = parse_frame_header(buf)? else {
        return Ok(None);
    };
    if header.frame_len() > max_packet_len {
        return Err(DecodeError::TooLarge(header));
    }
    let frame_len = header.frame_len();
    if buf.len() < frame_len {
        return Ok(None);
    }
    let mut body = Reader::new(&buf[header.header_len..frame_len]);
    let packet = match (header.packet_type, version) {
        (CONNECT, None) => {
            expect_flags(header, 0)?;
            Packet::Connect(decode_connect(&mut body)?)
        }
        (CONNECT, Some(_)) => return Err(DecodeError::Protocol("second CONNECT")),
        (_, None) => return Err(DecodeError::Protocol("the first packet must be CONNECT")),
        (PUBLISH, Some(version)) => {
            Packet::Publish(decode_publish(header.flags, &mut body, version)?)
        }
        (PUBACK, Some(_)) => {
            expect_flags(header, 0)?;
            Packet::PubAck {
                pkid: decode_ack_pkid(&mut body)?,
            }
        }
        (PUBREC, Some(_)) => {
            expect_flags(header, 0)?;
            Packet::PubRec {
                pkid: decode_ack_pkid(&mut body)?,
            }
        }
        (PUBREL, Some(_)) => {
            expect_flags(header, 0b0010)?;
            Packet::PubRel {
                pkid: decode_ack_pkid(&mut body)?,
            }
        }
        (PUBCOMP, Some(_)) => {
            expect_flags(header, 0)?;
            Packet::PubComp {
                pkid: decode_ack_pkid(&mut body)?,
            }
        }
        (SUBSCRIBE, Some(version)) => {
            expect_flags(header, 0b0010)?;
            Packet::Subscribe(decode_subscribe(&mut body, version)?)
        }
        (UNSUBSCRIBE, Some(version)) => {
            expect_flags(header, 0b0010)?;
            Packet::Unsubscribe(decode_unsubscribe(&mut body, version)?)
        }
        (PINGREQ, Some(_)) => {
            expect_flags(header, 0)?;
            if !body.is_empty() {
                return Err(DecodeError::Malformed("PINGREQ with a body"));
            }
            Packet::PingReq
        }
        (DISCONNECT, Some(version)) => {
            expect_flags(header, 0)?;
            let reason = match version {
                Version::V311 if body.is_empty() => 0,
                Version::V311 => return Err(DecodeError::Malformed("DISCONNECT with a body")),
                Version::V5 if body.is_empty() => 0,
                Version::V5 => {
                    let reason = body.u8()?;
                    if !body.is_empty() {
                        skip_properties(&mut body)?;
                    }
                    reason
                }
            };
            Packet::Disconnect { reason }
        }
        (AUTH, Some(Version::V5)) => Packet::Auth,
        _ => return Err(DecodeError::Protocol("a packet type clients do not send")),
    };
    if !body.is_empty() {
        return Err(DecodeError::Malformed("bytes after the end of the packet"));
    }
    Ok(Some((packet, frame_len)))
}

fn expect_flags(header: FrameHeader, flags: u8) -> Result<(), DecodeError> {
    if header.flags == flags {
        Ok(())
    } else {
        Err(DecodeError::Malformed("reserved fixed-header flags"))
    }
}

fn decode_connect<'a>(body: &mut Reader<'a>) -> Result<Connect<'a>, DecodeError> {
    let protocol_name = body.utf8()?;
    let level = body.u8()?;
    let version = match (protocol_name, level) {
        ("MQTT", 4) => Version::V311,
        ("MQTT", 5) => Version::V5,
        ("MQTT" | "MQIsdp", level) => return Err(DecodeError::UnsupportedVersion(level)),
        _ => return Err(DecodeError::Malformed("unknown protocol name")),
    };
    let flags = body.u8()?;
    if flags & 0x01 != 0 {
        return Err(DecodeError::Malformed("reserved CONNECT flag set"));
    }
    let clean_start = flags & 0x02 != 0;
    let will_flag = flags & 0x04 != 0;
    let will_qos = (flags >> 3) & 0x03;
    let will_retain = flags & 0x20 != 0;
    let password_flag = flags & 0x40 != 0;
    let username_flag = flags & 0x80 != 0;
    if will_qos == 3 || (!will_flag && (will_qos != 0 || will_retain)) {
        return Err(DecodeError::Malformed("will flags"));
    }
    if version == Version::V311 && password_flag && !username_flag {
        return Err(DecodeError::Malformed("password without user name"));
    }
    let keep_alive = body.u16()?;
    let mut maximum_packet_size = None;
    let mut session_expiry_interval = 0;
    let mut request_problem_information = true;
    let mut authentication_method = None;
    if version == Version::V5 {
        for_each_property(body, |id, value| {
            match (id, value) {
                (0x27, PropertyValue::U32(0)) => {
                    return Err(DecodeError::Protocol("maximum packet size 0"));
                }
                (0x27, PropertyValue::U32(size)) => maximum_packet_size = Some(size),
                (0x11, PropertyValue::U32(seconds)) => session_expiry_interval = seconds,
                (0x17, PropertyValue::Byte(flag)) => request_problem_information = flag != 0,
                (0x15, PropertyValue::Str(method)) => authentication_method = Some(method),
                (0x21, PropertyValue::U16(0)) => {
                    return Err(DecodeError::Protocol("receive maximum 0"));
                }
                (0x21 | 0x22 | 0x19 | 0x26 | 0x16, _) => {}
                _ => return Err(DecodeError::Protocol("property not allowed in CONNECT")),
            }
            Ok(())
        })?;
    }
    let client_id = body.utf8()?;
    let will = if will_flag {
        if version == Version::V5 {
            skip_properties(body)?;
        }
        let topic = body.utf8()?;
        let payload = body.binary()?;
        Some(Will {
            topic,
            payload,
            qos: will_qos,
            retain: will_retain,
        })
    } else {
        None
    };
    let username = if username_flag {
        Some(body.utf8()?)
    } else {
        None
    };
    let password = if password_flag {
        Some(body.binary()?)
    } else {
        None
    };
    Ok(Connect {
        version,
        client_id,
        clean_start,
        keep_alive,
        username,
        password,
        will,
        session_expiry_interval,
        maximum_packet_size,
        request_problem_information,
        authentication_method,
    })
}

fn decode_publish<'a>(
    flags: u8,
    body: &mut Reader<'a>,
    version: Version,
) -> Result<Publish<'a>, DecodeError> {
    let qos = (flags >> 1) & 0x03;
    let dup = flags & 0x08 != 0;
    let retain = flags & 0x01 != 0;
    if qos == 3 {
        return Err(DecodeError::Malformed("PUBLISH with QoS 3"));
    }
    if qos == 0 && dup {
        return Err(DecodeError::Malformed("DUP set on a QoS 0 PUBLISH"));
    }
    let topic = body.utf8()?;
    let pkid = if qos > 0 { body.pkid()? } else { 0 };
    let mut topic_alias = None;
    if version == Version::V5 {
        for_each_property(body, |id, value| {
            match (id, value) {
                (0x23, PropertyValue::U16(alias)) => topic_alias = Some(alias),
                (0x0B, _) => {
                    return Err(DecodeError::Protocol(
                        "subscription identifier in a client's PUBLISH",
                    ))
                }
                (0x01 | 0x02 | 0x03 | 0x08 | 0x09 | 0x26, _) => {}
                _ => return Err(DecodeError::Protocol("property not allowed in PUBLISH")),
            }
            Ok(())
        })?;
    }
    Ok(Publish {
        qos,
        dup,
        retain,
        topic,
        pkid,
        topic_alias,
        payload: body.rest(),
    })
}

/// The packet identifier of PUBACK, PUBREC, PUBREL or PUBCOMP; an MQTT 5 reason code and
/// properties after it are read and ignored.
fn decode_ack_pkid(body: &mut Reader<'_>) -> Result<u16, DecodeError> {
    let pkid = body.pkid()?;
    if !body.is_empty() {
        body.u8()?;
        if !body.is_empty() {
            skip_properties(body)?;
        }
    }
    Ok(pkid)
}

fn decode_subscribe<'a>(
    body: &mut Reader<'a>,
    version: Version,
) -> Result<Subscribe<'a>, DecodeError> {
    let pkid = body.pkid()?;
    if version == Version::V5 {
        skip_properties(body)?;
    }
    let mut filters = Vec::new();
    while !body.is_empty() {
        let filter = body.utf8()?;
        let options = body.u8()?;
        let qos = options & 0x03;
        let reserved = match version {
            Version::V311 => options & 0xfc,
            // Bits 6 and 7 are reserved; retain handling 3 is invalid.
            Version::V5 => (options & 0xc0) | u8::from(options & 0x30 == 0x30),
        };
        if qos == 3 || reserved != 0 {
            return Err(DecodeError::Malformed("subscription options"));
        }
        filters.push(SubscribeFilter { filter, qos });
    }
    if filters.is_empty() {
        return Err(DecodeError::Protocol("SUBSCRIBE without a filter"));
    }
    Ok(Subscribe { pkid, filters })
}

fn decode_unsubscribe<'a>(
    body: &mut Reader<'a>,
    version: Version,
) -> Result<Unsubscribe<'a>, DecodeError> {
    let pkid = body.pkid()?;
    if version == Version::V5 {
        skip_properties(body)?;
    }
    let mut filters = Vec::new();
    while !body.is_empty() {
        filters.push(body.utf8()?);
    }
    if filters.is_empty() {
        return Err(DecodeError::Protocol("UNSUBSCRIBE without a filter"));
    }
    Ok(Unsubscribe { pkid, filters })
}

/// One MQTT 5 property value, typed by its identifier. Every property is read, and so
/// validated, even when the ingress has no use for its value.
#[derive(Clone, Copy, Debug)]
#[allow(dead_code)]
enum PropertyValue<'a> {
    Byte(u8),
    U16(u16),
    U32(u32),
    VarInt(u32),
    Str(&'a str),
    Binary(&'a [u8]),
    Pair(&'a str, &'a str),
}

fn for_each_property<'a>(
    body: &mut Reader<'a>,
    mut each: impl FnMut(u8, PropertyValue<'a>) -> Result<(), DecodeError>,
) -> Result<(), DecodeError> {
    let len = body.varint()? as usize;
    let mut properties = Reader::new(body.take(len)?);
    while !properties.is_empty() {
        let id = properties.u8()?;
        let value = match id {
            0x01 | 0x17 | 0x19 | 0x24 | 0x25 | 0x28 | 0x29 | 0x2A => {
                PropertyValue::Byte(properties.u8()?)
            }
            0x13 | 0x21 | 0x22 | 0x23 => PropertyValue::U16(properties.u16()?),
            0x02 | 0x11 | 0x18 | 0x27 => PropertyValue::U32(properties.u32()?),
            0x0B => PropertyValue::VarInt(properties.varint()?),
            0x03 | 0x08 | 0x12 | 0x15 | 0x1A | 0x1C | 0x1F => {
                PropertyValue::Str(properties.utf8()?)
            }
            0x09 | 0x16 => PropertyValue::Binary(properties.binary()?),
            0x26 => PropertyValue::Pair(properties.utf8()?, properties.utf8()?),
            _ => return Err(DecodeError::Malformed("unknown property identifier")),
        };
        each(id, value)?;
    }
    Ok(())
}

fn skip_properties(body: &mut Reader<'_>) -> Result<(), DecodeError> {
    for_each_property(body, |_, value| {
        // Values are read (and so validated) even when unused.
        let _ = value;
        Ok(())
    })
}

/// A bounds-checked cursor over a packet body.
struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Self { buf }
    }

    fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if n > self.buf.len() {
            return Err(DecodeError::Malformed(
                "field runs past the end of the packet",
            ));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.buf)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, DecodeError> {
        let bytes = self.take(2)?;
        Ok(u16::from_be_bytes([bytes[0], bytes[1]]))
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        let bytes = self.take(4)?;
        Ok(u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
    }

    fn pkid(&mut self) -> Result<u16, DecodeError> {
        match self.u16()? {
            0 => Err(DecodeError::Malformed("packet identifier 0")),
            pkid => Ok(pkid),
        }
    }

    fn varint(&mut self) -> Result<u32, DecodeError> {
        let mut value = 0u32;
        for i in 0..4 {
            let byte = self.u8()?;
            value |= u32::from(byte & 0x7f) << (7 * i);
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(DecodeError::Malformed(
            "variable byte integer longer than 4 bytes",
        ))
    }

    fn binary(&mut self) -> Result<&'a [u8], DecodeError> {
        let len = usize::from(self.u16()?);
        self.take(len)
    }

    fn utf8(&mut self) -> Result<&'a str, DecodeError> {
        let bytes = self.binary()?;
        let text = std::str::from_utf8(bytes)
            .map_err(|_| DecodeError::Malformed("string is not UTF-8"))?;
        if text.contains('\0') {
            return Err(DecodeError::Malformed("string contains U+0000"));
        }
        Ok(text)
    }
}

// ---- Encoding --------------------------------------------------------------------------------

fn put_varint(out: &mut Vec<u8>, mut value: usize) {
    loop {
        let byte = (value & 0x7f) as u8;
        value >>= 7;
        if value == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

fn varint_len(value: usize) -> usize {
    match value {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    }
}

fn put_utf8(out: &mut Vec<u8>, text: &str) {
    out.extend_from_slice(&(text.len() as u16).to_be_bytes());
    out.extend_from_slice(text.as_bytes());
}

/// Longest reason string the ingress sends, in bytes.
pub const MAX_REASON_STRING: usize = 200;

fn clip_reason(text: &str) -> &str {
    if text.len() <= MAX_REASON_STRING {
        return text;
    }
    let mut end = MAX_REASON_STRING;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// What the server tells an MQTT 5 client in its CONNACK.
#[derive(Clone, Debug, Default)]
pub struct ConnAckProperties<'a> {
    /// How many QoS 1 messages the client may have unacknowledged.
    pub receive_maximum: u16,
    /// Largest packet the server accepts.
    pub maximum_packet_size: u32,
    /// Set when the client sent an empty client id.
    pub assigned_client_id: Option<&'a str>,
    pub reason_string: Option<&'a str>,
}

/// Encodes a CONNACK. For 3.1.1 the MQTT 5 `reason` maps to the nearest 3.1.1 return code and
/// the properties are not sent.
pub fn encode_connack(
    out: &mut Vec<u8>,
    version: Version,
    session_present: bool,
    reason: u8,
    properties: &ConnAckProperties<'_>,
) {
    out.push(CONNACK << 4);
    match version {
        Version::V311 => {
            let code = match reason {
                reason::SUCCESS => 0,
                reason::UNSUPPORTED_PROTOCOL_VERSION => 1,
                reason::CLIENT_IDENTIFIER_NOT_VALID => 2,
                reason::SERVER_UNAVAILABLE | reason::SERVER_BUSY => 3,
                reason::BAD_USER_NAME_OR_PASSWORD => 4,
                _ => 5,
            };
            out.extend_from_slice(&[2, u8::from(session_present && code == 0), code]);
        }
        Version::V5 => {
            let mut props = Vec::with_capacity(64);
            if reason == reason::SUCCESS {
                props.push(0x21);
                props.extend_from_slice(&properties.receive_maximum.max(1).to_be_bytes());
                // Maximum QoS 1: QoS 2 is not offered.
                props.extend_from_slice(&[0x24, 1]);
                // Retained messages are not kept.
                props.extend_from_slice(&[0x25, 0]);
                props.push(0x27);
                props.extend_from_slice(&properties.maximum_packet_size.to_be_bytes());
                // No subscription identifiers, no shared subscriptions.
                props.extend_from_slice(&[0x29, 0, 0x2A, 0]);
                if let Some(id) = properties.assigned_client_id {
                    props.push(0x12);
                    put_utf8(&mut props, id);
                }
            }
            if let Some(text) = properties.reason_string {
                props.push(0x1F);
                put_utf8(&mut props, clip_reason(text));
            }
            put_varint(out, 2 + varint_len(props.len()) + props.len());
            out.extend_from_slice(&[u8::from(session_present && reason == 0), reason]);
            put_varint(out, props.len());
            out.extend_from_slice(&props);
        }
    }
}

/// Encodes a PUBACK. 3.1.1 has no reason code: `reason` and `reason_string` are dropped.
pub fn encode_puback(
    out: &mut Vec<u8>,
    version: Version,
    pkid: u16,
    reason: u8,
    reason_string: Option<&str>,
) {
    out.push(PUBACK << 4);
    match (version, reason, reason_string) {
        (Version::V311, _, _) | (Version::V5, reason::SUCCESS, None) => {
            out.push(2);
            out.extend_from_slice(&pkid.to_be_bytes());
        }
        (Version::V5, reason, None) => {
            out.push(3);
            out.extend_from_slice(&pkid.to_be_bytes());
            out.push(reason);
        }
        (Version::V5, reason, Some(text)) => {
            let text = clip_reason(text);
            let props_len = 3 + text.len();
            put_varint(out, 3 + varint_len(props_len) + props_len);
            out.extend_from_slice(&pkid.to_be_bytes());
            out.push(reason);
            put_varint(out, props_len);
            out.push(0x1F);
            put_utf8(out, text);
        }
    }
}

/// Encodes a SUBACK with one MQTT 5 reason code per filter; for 3.1.1 every failure becomes
/// 0x80.
pub fn encode_suback(out: &mut Vec<u8>, version: Version, pkid: u16, codes: &[u8]) {
    out.push(SUBACK << 4);
    let props_len = usize::from(version == Version::V5);
    put_varint(out, 2 + props_len + codes.len());
    out.extend_from_slice(&pkid.to_be_bytes());
    if version == Version::V5 {
        out.push(0);
        out.extend_from_slice(codes);
    } else {
        out.extend(
            codes
                .iter()
                .map(|&code| if code < 0x80 { code } else { 0x80 }),
        );
    }
}

/// Encodes an UNSUBACK answering `n_filters` filters, all successfully.
pub fn encode_unsuback(out: &mut Vec<u8>, version: Version, pkid: u16, n_filters: usize) {
    out.push(UNSUBACK << 4);
    match version {
        Version::V311 => {
            out.push(2);
            out.extend_from_slice(&pkid.to_be_bytes());
        }
        Version::V5 => {
            put_varint(out, 3 + n_filters);
            out.extend_from_slice(&pkid.to_be_bytes());
            out.push(0);
            out.extend(std::iter::repeat_n(reason::SUCCESS, n_filters));
        }
    }
}

pub fn encode_pingresp(out: &mut Vec<u8>) {
    out.extend_from_slice(&[PINGRESP << 4, 0]);
}

/// Encodes an MQTT 5 DISCONNECT; 3.1.1 has no server DISCONNECT, so nothing is written for it.
pub fn encode_disconnect(
    out: &mut Vec<u8>,
    version: Version,
    reason: u8,
    reason_string: Option<&str>,
) {
    if version == Version::V311 {
        return;
    }
    out.push(DISCONNECT << 4);
    match reason_string {
        None => out.extend_from_slice(&[1, reason]),
        Some(text) => {
            let text = clip_reason(text);
            let props_len = 3 + text.len();
            put_varint(out, 1 + varint_len(props_len) + props_len);
            out.push(reason);
            put_varint(out, props_len);
            out.push(0x1F);
            put_utf8(out, text);
        }
    }
}

/// Length of the QoS 0 PUBLISH [`encode_publish`] writes.
pub fn publish_len(version: Version, topic: &[u8], payload: &[u8]) -> usize {
    let remaining = 2 + topic.len() + payload.len() + usize::from(version == Version::V5);
    1 + varint_len(remaining) + remaining
}

/// Encodes a QoS 0 PUBLISH towards a device. `topic` must be valid UTF-8 of at most 65,535
/// bytes (the broker only hands over topics it accepted from MQTT).
pub fn encode_publish(out: &mut Vec<u8>, version: Version, topic: &[u8], payload: &[u8]) {
    out.push(PUBLISH << 4);
    let remaining = 2 + topic.len() + payload.len() + usize::from(version == Version::V5);
    put_varint(out, remaining);
    out.extend_from_slice(&(topic.len() as u16).to_be_bytes());
    out.extend_from_slice(topic);
    if version == Version::V5 {
        out.push(0);
    }
    out.extend_from_slice(payload);
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: usize = 1 << 20;

    fn frame(packet_type: u8, flags: u8, body: &[u8]) -> Vec<u8> {
        let mut out = vec![(packet_type << 4) | flags];
        put_varint(&mut out, body.len());
        out.extend_from_slice(body);
        out
    }

    fn connect_body(level: u8, flags: u8, props: Option<&[u8]>, payload: &[u8]) -> Vec<u8> {
        let mut body = Vec::new();
        put_utf8(&mut body, "MQTT");
        body.push(level);
        body.push(flags);
        body.extend_from_slice(&30u16.to_be_bytes());
        if let Some(props) = props {
            put_varint(&mut body, props.len());
            body.extend_from_slice(props);
        }
        body.extend_from_slice(payload);
        body
    }

    fn strings(parts: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        for part in parts {
            out.extend_from_slice(&(part.len() as u16).to_be_bytes());
            out.extend_from_slice(part);
        }
        out
    }

    #[test]
    fn decodes_a_311_connect_with_credentials() {
        let payload = strings(&[b"meter-1", b"meter-1", b"secret"]);
        let bytes = frame(CONNECT, 0, &connect_body(4, 0xC2, None, &payload));
        let (packet, len) = decode(&bytes, None, MAX).unwrap().unwrap();
        assert_eq!(len, bytes.len());
        let Packet::Connect(connect) = packet else {
            panic!("{packet:?}")
        };
        assert_eq!(connect.version, Version::V311);
        assert_eq!(connect.client_id, "meter-1");
        assert_eq!(connect.username, Some("meter-1"));
        assert_eq!(connect.password, Some(&b"secret"[..]));
        assert!(connect.clean_start);
        assert_eq!(connect.keep_alive, 30);
        assert!(!format!("{connect:?}").contains("secret"));
    }

    #[test]
    fn decodes_a_v5_connect_with_properties_and_will() {
        // Maximum packet size 1000, request problem information 0, session expiry 60, a user
        // property.
        let mut props = vec![0x27, 0, 0, 0x03, 0xE8, 0x17, 0, 0x11, 0, 0, 0, 60];
        props.push(0x26);
        props.extend_from_slice(&strings(&[b"k", b"v"]));
        let mut payload = strings(&[b""]);
        payload.push(0); // will properties
        payload.extend_from_slice(&strings(&[b"devices/d/status", b"gone", b"d", b"pw"]));
        // User name, password, will QoS 1, will, clean start.
        let bytes = frame(
            CONNECT,
            0,
            &connect_body(5, 0xC0 | 0x08 | 0x04 | 0x02, Some(&props), &payload),
        );
        let (packet, _) = decode(&bytes, None, MAX).unwrap().unwrap();
        let Packet::Connect(connect) = packet else {
            panic!("{packet:?}")
        };
        assert_eq!(connect.version, Version::V5);
        assert_eq!(connect.client_id, "");
        assert_eq!(connect.maximum_packet_size, Some(1000));
        assert_eq!(connect.session_expiry_interval, 60);
        assert!(!connect.request_problem_information);
        assert_eq!(
            connect.will,
            Some(Will {
                topic: "devices/d/status",
                payload: b"gone",
                qos: 1,
                retain: false
            })
        );
    }

    #[test]
    fn refuses_other_protocol_levels_and_names() {
        let bytes = frame(CONNECT, 0, &connect_body(3, 0x02, None, &strings(&[b"x"])));
        assert_eq!(
            decode(&bytes, None, MAX).unwrap_err(),
            DecodeError::UnsupportedVersion(3)
        );
        let mut body = Vec::new();
        put_utf8(&mut body, "HTTP");
        body.extend_from_slice(&[4, 2, 0, 0]);
        assert!(matches!(
            decode(&frame(CONNECT, 0, &body), None, MAX),
            Err(DecodeError::Malformed(_))
        ));
    }

    #[test]
    fn decodes_publish_at_each_qos() {
        let check =
            |version: Version, flags: u8, body: &[u8], expected: Result<Publish, DecodeError>| {
                let bytes = frame(PUBLISH, flags, body);
                let got = decode(&bytes, Some(version), MAX).map(|packet| match packet {
                    Some((Packet::Publish(publish), _)) => publish,
                    other => panic!("{other:?}"),
                });
                assert_eq!(got, expected, "{flags:#x} {body:?}");
            };
        let mut qos0 = strings(&[b"a/b"]);
        qos0.extend_from_slice(b"{}");
        check(
            Version::V311,
            0,
            &qos0,
            Ok(Publish {
                qos: 0,
                dup: false,
                retain: false,
                topic: "a/b",
                pkid: 0,
                topic_alias: None,
                payload: b"{}",
            }),
        );
        let mut qos1 = strings(&[b"a/b"]);
        qos1.extend_from_slice(&[0, 7]);
        qos1.extend_from_slice(b"xy");
        check(
            Version::V311,
            0b1011,
            &qos1,
            Ok(Publish {
                qos: 1,
                dup: true,
                retain: true,
                topic: "a/b",
                pkid: 7,
                topic_alias: None,
                payload: b"xy",
            }),
        );
        // MQTT 5: properties between the packet id and the payload.
        let mut v5 = strings(&[b"a"]);
        v5.extend_from_slice(&[0, 9, 3, 0x23, 0, 4]);
        v5.extend_from_slice(b"p");
        check(
            Version::V5,
            0b0010,
            &v5,
            Ok(Publish {
                qos: 1,
                dup: false,
                retain: false,
                topic: "a",
                pkid: 9,
                topic_alias: Some(4),
                payload: b"p",
            }),
        );
        let mut pkid0 = strings(&[b"a"]);
        pkid0.extend_from_slice(&[0, 0]);
        check(
            Version::V311,
            0b0010,
            &pkid0,
            Err(DecodeError::Malformed("packet identifier 0")),
        );
        check(
            Version::V311,
            0b0110,
            &qos1,
            Err(DecodeError::Malformed("PUBLISH with QoS 3")),
        );
        check(
            Version::V311,
            0b1000,
            &qos0,
            Err(DecodeError::Malformed("DUP set on a QoS 0 PUBLISH")),
        );
    }

    #[test]
    fn incomplete_packets_wait_and_large_ones_fail_early() {
        let mut body = strings(&[b"t"]);
        body.extend_from_slice(&[0u8; 300]);
        let bytes = frame(PUBLISH, 0, &body);
        for cut in 0..bytes.len() {
            assert_eq!(
                decode(&bytes[..cut], Some(Version::V311), MAX),
                Ok(None),
                "{cut}"
            );
        }
        // Only the fixed header is needed to refuse an oversized packet.
        let err = decode(&bytes[..3], Some(Version::V311), 100).unwrap_err();
        assert!(matches!(err, DecodeError::TooLarge(h) if h.remaining_len == body.len()));
    }

    #[test]
    fn packets_before_connect_and_second_connects_are_protocol_errors() {
        assert_eq!(
            decode(&[PINGREQ << 4, 0], None, MAX),
            Err(DecodeError::Protocol("the first packet must be CONNECT"))
        );
        let bytes = frame(CONNECT, 0, &connect_body(4, 2, None, &strings(&[b"x"])));
        assert_eq!(
            decode(&bytes, Some(Version::V311), MAX),
            Err(DecodeError::Protocol("second CONNECT"))
        );
    }

    #[test]
    fn decodes_subscribe_and_unsubscribe() {
        let mut body = vec![0, 5];
        body.extend_from_slice(&strings(&[b"devices/d/#"]));
        body.push(1);
        let bytes = frame(SUBSCRIBE, 2, &body);
        assert_eq!(
            decode(&bytes, Some(Version::V311), MAX).unwrap().unwrap().0,
            Packet::Subscribe(Subscribe {
                pkid: 5,
                filters: vec![SubscribeFilter {
                    filter: "devices/d/#",
                    qos: 1
                }]
            })
        );
        // Reserved option bits are refused in 3.1.1.
        *body.last_mut().unwrap() = 0x05;
        assert!(decode(&frame(SUBSCRIBE, 2, &body), Some(Version::V311), MAX).is_err());
        let mut body = vec![0, 6, 0];
        body.extend_from_slice(&strings(&[b"a", b"b"]));
        assert_eq!(
            decode(&frame(UNSUBSCRIBE, 2, &body), Some(Version::V5), MAX)
                .unwrap()
                .unwrap()
                .0,
            Packet::Unsubscribe(Unsubscribe {
                pkid: 6,
                filters: vec!["a", "b"]
            })
        );
    }

    #[test]
    fn encodes_answers() {
        let check = |encode: &dyn Fn(&mut Vec<u8>), expected: &[u8]| {
            let mut out = Vec::new();
            encode(&mut out);
            assert_eq!(out, expected);
        };
        check(
            &|out| {
                encode_puback(
                    out,
                    Version::V311,
                    0x0102,
                    reason::PAYLOAD_FORMAT_INVALID,
                    Some("x"),
                )
            },
            &[0x40, 2, 1, 2],
        );
        check(
            &|out| encode_puback(out, Version::V5, 7, reason::SUCCESS, None),
            &[0x40, 2, 0, 7],
        );
        check(
            &|out| encode_puback(out, Version::V5, 7, reason::PAYLOAD_FORMAT_INVALID, None),
            &[0x40, 3, 0, 7, 0x99],
        );
        check(
            &|out| {
                encode_puback(
                    out,
                    Version::V5,
                    7,
                    reason::PAYLOAD_FORMAT_INVALID,
                    Some("no"),
                )
            },
            &[0x40, 9, 0, 7, 0x99, 5, 0x1F, 0, 2, b'n', b'o'],
        );
        check(
            &|out| {
                encode_connack(
                    out,
                    Version::V311,
                    false,
                    reason::BAD_USER_NAME_OR_PASSWORD,
                    &Default::default(),
                )
            },
            &[0x20, 2, 0, 4],
        );
        check(
            &|out| encode_suback(out, Version::V311, 3, &[0, reason::NOT_AUTHORIZED]),
            &[0x90, 4, 0, 3, 0, 0x80],
        );
        check(
            &|out| encode_suback(out, Version::V5, 3, &[0, reason::NOT_AUTHORIZED]),
            &[0x90, 5, 0, 3, 0, 0, 0x87],
        );
        check(
            &|out| encode_disconnect(out, Version::V5, reason::NOT_AUTHORIZED, None),
            &[0xE0, 1, 0x87],
        );
        check(
            &|out| encode_disconnect(out, Version::V311, reason::NOT_AUTHORIZED, None),
            &[],
        );
        check(
            &|out| encode_publish(out, Version::V5, b"t", b"p"),
            &[0x30, 5, 0, 1, b't', 0, b'p'],
        );
        assert_eq!(publish_len(Version::V5, b"t", b"p"), 7);
    }

    #[test]
    fn v5_connack_carries_the_limits() {
        let mut out = Vec::new();
        let props = ConnAckProperties {
            receive_maximum: 64,
            maximum_packet_size: 65_536,
            assigned_client_id: Some("d"),
            reason_string: None,
        };
        encode_connack(&mut out, Version::V5, false, reason::SUCCESS, &props);
        let header = parse_frame_header(&out).unwrap().unwrap();
        assert_eq!(header.frame_len(), out.len());
        assert_eq!(&out[2..4], &[0, 0]);
        let mut body = Reader::new(&out[4..]);
        let mut seen = Vec::new();
        for_each_property(&mut body, |id, value| {
            seen.push(format!("{id:#04x}={value:?}"));
            Ok(())
        })
        .unwrap();
        assert_eq!(
            seen,
            [
                "0x21=U16(64)",
                "0x24=Byte(1)",
                "0x25=Byte(0)",
                "0x27=U32(65536)",
                "0x29=Byte(0)",
                "0x2a=Byte(0)",
                "0x12=Str(\"d\")"
            ]
        );
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..200)) {
            for version in [None, Some(Version::V311), Some(Version::V5)] {
                let _ = decode(&bytes, version, 150);
            }
        }

        #[test]
        fn arbitrary_bodies_never_panic(
            packet_type in 0u8..16,
            flags in 0u8..16,
            body in proptest::collection::vec(proptest::num::u8::ANY, 0..120),
        ) {
            let bytes = frame(packet_type, flags, &body);
            for version in [None, Some(Version::V311), Some(Version::V5)] {
                let _ = decode(&bytes, version, MAX);
            }
        }
    }
}
