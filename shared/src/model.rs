//! The data model: validated names, values, readings and their quality.

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// Longest device, metric, gateway or stream name, in bytes.
pub const MAX_NAME_LEN: usize = 64;
/// Longest string value, in bytes of UTF-8.
pub const MAX_STR_LEN: usize = 255;

/// Why a name was refused. Each variant says what kind of name it was and what to fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("{kind} name is empty")]
    Empty { kind: &'static str },
    #[error("{kind} name is {len} bytes long; the limit is {max}")]
    TooLong {
        kind: &'static str,
        len: usize,
        max: usize,
    },
    #[error(
        "{kind} name {name:?} has {ch:?} at byte {pos}; allowed are ASCII letters, digits and _ - . :"
    )]
    BadChar {
        kind: &'static str,
        name: String,
        ch: char,
        pos: usize,
    },
    #[error("{kind} name {name:?} must start with a letter, a digit or _")]
    BadStart { kind: &'static str, name: String },
}

fn validate_name(kind: &'static str, name: &str) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty { kind });
    }
    if name.len() > MAX_NAME_LEN {
        return Err(NameError::TooLong {
            kind,
            len: name.len(),
            max: MAX_NAME_LEN,
        });
    }
    if let Some((pos, ch)) = name
        .char_indices()
        .find(|&(_, c)| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ':')))
    {
        return Err(NameError::BadChar {
            kind,
            name: name.to_owned(),
            ch,
            pos,
        });
    }
    let first = name.as_bytes()[0];
    if !(first.is_ascii_alphanumeric() || first == b'_') {
        return Err(NameError::BadStart {
            kind,
            name: name.to_owned(),
        });
    }
    Ok(())
}

/// Defines a validated, cheaply clonable name type. Names never contain MQTT wildcards, `/`,
/// whitespace or control characters, so they are safe in topics, paths, URLs and SQL identifiers.
macro_rules! name_type {
    ($(#[$doc:meta])* $name:ident, $kind:literal) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(Arc<str>);

        impl $name {
            /// Validates `name` and wraps it.
            pub fn new(name: &str) -> Result<Self, NameError> {
                validate_name($kind, name)?;
                Ok(Self(Arc::from(name)))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = NameError;
            fn try_from(name: String) -> Result<Self, NameError> {
                Self::new(&name)
            }
        }

        impl TryFrom<&str> for $name {
            type Error = NameError;
            fn try_from(name: &str) -> Result<Self, NameError> {
                Self::new(name)
            }
        }

        impl std::str::FromStr for $name {
            type Err = NameError;
            fn from_str(name: &str) -> Result<Self, NameError> {
                Self::new(name)
            }
        }

        impl From<$name> for String {
            fn from(name: $name) -> String {
                name.0.as_ref().to_owned()
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&*self.0, f)
            }
        }
    };
}

name_type!(
    /// A terminal device, unique within its gateway (`meter-07`, `plc1`).
    DeviceId,
    "device"
);
name_type!(
    /// A measured quantity of a device (`temperature`, `power.l1`).
    MetricName,
    "metric"
);
name_type!(
    /// A gateway, unique within its tenant.
    GatewayId,
    "gateway"
);
name_type!(
    /// A data stream from one gateway to one cloud target (`raw`, `agg-1m`).
    StreamId,
    "stream"
);

/// A string value of at most [`MAX_STR_LEN`] bytes.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ShortStr(Arc<str>);

/// The string given for a [`ShortStr`] was longer than [`MAX_STR_LEN`] bytes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("string value is {len} bytes long; the limit is {MAX_STR_LEN}")]
pub struct StrTooLong {
    pub len: usize,
}

impl ShortStr {
    pub fn new(s: &str) -> Result<Self, StrTooLong> {
        if s.len() > MAX_STR_LEN {
            return Err(StrTooLong { len: s.len() });
        }
        Ok(Self(Arc::from(s)))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for ShortStr {
    type Error = StrTooLong;
    fn try_from(s: String) -> Result<Self, StrTooLong> {
        Self::new(&s)
    }
}

impl From<ShortStr> for String {
    fn from(s: ShortStr) -> String {
        s.0.as_ref().to_owned()
    }
}

impl fmt::Debug for ShortStr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl fmt::Display for ShortStr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A measured value.
///
/// Equality is bitwise for floats (`NaN == NaN` when the payloads match, `0.0 != -0.0`), because
/// the codec promises to carry every bit pattern through unchanged.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Value {
    F64(f64),
    I64(i64),
    Bool(bool),
    Str(ShortStr),
}

impl PartialEq for Value {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Value::F64(a), Value::F64(b)) => a.to_bits() == b.to_bits(),
            (Value::I64(a), Value::I64(b)) => a == b,
            (Value::Bool(a), Value::Bool(b)) => a == b,
            (Value::Str(a), Value::Str(b)) => a == b,
            _ => false,
        }
    }
}

impl Eq for Value {}

impl Value {
    pub fn kind(&self) -> ValueKind {
        match self {
            Value::F64(_) => ValueKind::F64,
            Value::I64(_) => ValueKind::I64,
            Value::Bool(_) => ValueKind::Bool,
            Value::Str(_) => ValueKind::Str,
        }
    }

    /// The value as a float, for aggregation: integers convert, bools are 0 or 1, strings are not
    /// numbers.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F64(v) => Some(v),
            Value::I64(v) => Some(v as f64),
            Value::Bool(v) => Some(if v { 1.0 } else { 0.0 }),
            Value::Str(_) => None,
        }
    }
}

/// The type of a [`Value`], as stored in the batch format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[repr(u8)]
pub enum ValueKind {
    F64 = 0,
    I64 = 1,
    Bool = 2,
    Str = 3,
}

impl ValueKind {
    pub fn from_u8(tag: u8) -> Option<Self> {
        Some(match tag {
            0 => ValueKind::F64,
            1 => ValueKind::I64,
            2 => ValueKind::Bool,
            3 => ValueKind::Str,
            _ => return None,
        })
    }
}

/// How far a reading can be trusted, set by the device or by the edge's cleaning pipeline.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[repr(u8)]
pub enum Quality {
    #[default]
    Good = 0,
    /// Plausible but flagged (a spike, a stuck sensor, a corrected clock).
    Uncertain = 1,
    /// Known wrong; kept for the record.
    Bad = 2,
}

impl Quality {
    pub fn from_u8(tag: u8) -> Option<Self> {
        Some(match tag {
            0 => Quality::Good,
            1 => Quality::Uncertain,
            2 => Quality::Bad,
            _ => return None,
        })
    }
}

/// One measurement of one metric of one device at one instant.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reading {
    pub device: DeviceId,
    pub metric: MetricName,
    /// UTC milliseconds since the Unix epoch.
    pub ts_ms: i64,
    pub value: Value,
    #[serde(default)]
    pub quality: Quality,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_accept_the_usual_shapes() {
        for name in [
            "meter-07",
            "plc1",
            "power.l1",
            "_x",
            "a:b",
            &"x".repeat(MAX_NAME_LEN),
        ] {
            DeviceId::new(name).unwrap_or_else(|e| panic!("{name}: {e}"));
        }
    }

    #[test]
    fn names_refuse_with_a_reason() {
        let check = |name: &str, expected: NameError| {
            assert_eq!(MetricName::new(name).unwrap_err(), expected, "{name}");
        };
        check("", NameError::Empty { kind: "metric" });
        check(
            &"x".repeat(65),
            NameError::TooLong {
                kind: "metric",
                len: 65,
                max: 64,
            },
        );
        check(
            "a/b",
            NameError::BadChar {
                kind: "metric",
                name: "a/b".into(),
                ch: '/',
                pos: 1,
            },
        );
        check(
            "temp #",
            NameError::BadChar {
                kind: "metric",
                name: "temp #".into(),
                ch: ' ',
                pos: 4,
            },
        );
        check(
            "-x",
            NameError::BadStart {
                kind: "metric",
                name: "-x".into(),
            },
        );
        let message = MetricName::new("a+b").unwrap_err().to_string();
        assert!(
            message.contains("'+'") && message.contains("byte 1"),
            "{message}"
        );
    }

    #[test]
    fn names_validate_when_deserialized() {
        let err = serde_json::from_str::<DeviceId>("\"a b\"").unwrap_err();
        assert!(err.to_string().contains("device name"), "{err}");
        let ok: DeviceId = serde_json::from_str("\"meter-1\"").unwrap();
        assert_eq!(ok.as_str(), "meter-1");
    }

    #[test]
    fn short_strings_are_bounded() {
        assert!(ShortStr::new(&"é".repeat(127)).is_ok());
        assert_eq!(
            ShortStr::new(&"x".repeat(256)).unwrap_err(),
            StrTooLong { len: 256 }
        );
    }

    #[test]
    fn float_values_compare_bitwise() {
        assert_eq!(Value::F64(f64::NAN), Value::F64(f64::NAN));
        assert_ne!(Value::F64(0.0), Value::F64(-0.0));
        assert_ne!(Value::F64(1.0), Value::I64(1));
    }
}
