//! Register maps: which registers of a device model carry which metric, in what type, scale and
//! poll period; parsed from TOML and validated before anything polls with them.
//!
//! # Format
//!
//! ```toml
//! # One file per device model.
//! model = "acme-em340"       # the device model, free text (1..=64 bytes)
//! poll_ms = 1000             # default poll period of the registers below (default 1000)
//!
//! [[registers]]
//! metric = "voltage.l1"      # a valid metric name, unique within the map
//! kind = "input"             # holding | input | coil | discrete
//! address = 0                # 0-based address on the wire (holding register 40001 is 0)
//! type = "u16"               # u16 | i16 | u32 | i32 | f32 for registers (default u16),
//!                            # bool for coils and discrete inputs (the default there)
//! scale = 0.1                # multiplier applied to the raw number (default 1)
//! decimals = 1               # round the scaled value to this many decimals (optional, 0..=15)
//! unit = "V"                 # informational only
//!
//! [[registers]]
//! metric = "energy.import"
//! kind = "holding"
//! address = 10
//! type = "u32"
//! word_order = "little"      # 32-bit types: big = high word first (default), little = low word first
//! poll_ms = 10000            # this register's own period
//! ```
//!
//! A register with an integer type, `scale = 1` and no `decimals` yields an integer reading; any
//! other register yields a float, coils and discrete inputs yield booleans (see `value_codec`).
//!
//! Every refusal names the file, the line, the key and the reason, e.g.
//! `energy-meter.toml:14: registers[2].word_order: applies to 32-bit types only, and u16 is one
//! register`. Registers may not overlap: reading one register as two metrics is almost always a
//! typo in the address.

use std::collections::HashMap;
use std::fmt;
use std::path::Path;
use std::time::Duration;

use fieldgate_shared::MetricName;
use serde::Deserialize;

/// Default poll period of a map whose file sets no `poll_ms`.
pub const DEFAULT_POLL_MS: u64 = 1_000;
/// Shortest accepted poll period: faster polling only floods the bus.
pub const MIN_POLL_MS: u64 = 10;
/// Longest accepted poll period: one day.
pub const MAX_POLL_MS: u64 = 86_400_000;
/// Most decimals a register may round to (the batch codec's decimal scale goes to 15 too).
pub const MAX_DECIMALS: u32 = 15;
/// Longest model name, in bytes.
pub const MAX_MODEL_LEN: usize = 64;

/// The four Modbus data tables.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RegisterKind {
    /// Read-write 16-bit registers, function code 3.
    Holding,
    /// Read-only 16-bit registers, function code 4.
    Input,
    /// Read-write bits, function code 1.
    Coil,
    /// Read-only bits, function code 2.
    Discrete,
}

impl RegisterKind {
    /// Whether this table holds single bits rather than 16-bit words.
    pub fn is_bit(self) -> bool {
        matches!(self, RegisterKind::Coil | RegisterKind::Discrete)
    }

    /// Most items one read request may ask for (Modbus application protocol, section 6).
    pub fn max_items_per_read(self) -> u16 {
        if self.is_bit() {
            2_000
        } else {
            125
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            RegisterKind::Holding => "holding",
            RegisterKind::Input => "input",
            RegisterKind::Coil => "coil",
            RegisterKind::Discrete => "discrete",
        }
    }
}

impl fmt::Display for RegisterKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How the raw register contents are interpreted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RegisterType {
    U16,
    I16,
    U32,
    I32,
    F32,
    /// One coil or discrete input.
    Bool,
}

impl RegisterType {
    /// How many table items (16-bit registers, or bits) one value occupies.
    pub fn width(self) -> u16 {
        match self {
            RegisterType::U16 | RegisterType::I16 | RegisterType::Bool => 1,
            RegisterType::U32 | RegisterType::I32 | RegisterType::F32 => 2,
        }
    }

    pub fn is_integer(self) -> bool {
        matches!(
            self,
            RegisterType::U16 | RegisterType::I16 | RegisterType::U32 | RegisterType::I32
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            RegisterType::U16 => "u16",
            RegisterType::I16 => "i16",
            RegisterType::U32 => "u32",
            RegisterType::I32 => "i32",
            RegisterType::F32 => "f32",
            RegisterType::Bool => "bool",
        }
    }
}

impl fmt::Display for RegisterType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Order of the two 16-bit words of a 32-bit value. Bytes within a word are always big-endian,
/// as Modbus sends them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WordOrder {
    /// High word first, at the lower address (the Modbus convention).
    #[default]
    Big,
    /// Low word first, at the lower address (common on meters built around little-endian CPUs).
    Little,
}

/// One validated register: where it lives, how to decode it, and how often to poll it.
#[derive(Clone, Debug, PartialEq)]
pub struct RegisterSpec {
    pub metric: MetricName,
    pub kind: RegisterKind,
    pub address: u16,
    pub register_type: RegisterType,
    pub word_order: WordOrder,
    /// Multiplier applied to the raw number; finite and not zero.
    pub scale: f64,
    /// Decimals the scaled value is rounded to, if any.
    pub decimals: Option<u32>,
    /// The engineering unit, for people reading the map; not used in decoding.
    pub unit: Option<String>,
    pub poll_period: Duration,
}

impl RegisterSpec {
    /// The address just past this register's last item.
    pub fn end_address(&self) -> u32 {
        u32::from(self.address) + u32::from(self.register_type.width())
    }

    /// Whether readings of this register are integers (`Value::I64`) rather than floats.
    pub fn yields_integer(&self) -> bool {
        self.register_type.is_integer() && self.scale == 1.0 && self.decimals.is_none()
    }
}

/// A validated register map of one device model. A `RegisterMap` in hand is always valid: the
/// only way to make one is through [`RegisterMap::from_toml_str`] or [`RegisterMap::from_file`].
#[derive(Clone, Debug, PartialEq)]
pub struct RegisterMap {
    model: String,
    registers: Vec<RegisterSpec>,
}

impl RegisterMap {
    pub fn model(&self) -> &str {
        &self.model
    }

    /// The registers in the order the file lists them.
    pub fn registers(&self) -> &[RegisterSpec] {
        &self.registers
    }

    /// Reads and validates a map file; errors name the file.
    pub fn from_file(path: &Path) -> Result<Self, RegisterMapError> {
        let text = std::fs::read_to_string(path).map_err(|source| RegisterMapError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_toml_str(&text, &path.display().to_string())
    }

    /// Parses and validates a map; `origin` (a file name, or a description such as `<inline>`)
    /// is quoted in every error.
    pub fn from_toml_str(text: &str, origin: &str) -> Result<Self, RegisterMapError> {
        let file: RegisterMapFile =
            toml::from_str(text).map_err(|source| RegisterMapError::Parse {
                origin: origin.to_owned(),
                source: Box::new(source),
            })?;
        validate(file, text, origin)
    }
}

/// Why a register map was refused.
#[derive(Debug, thiserror::Error)]
pub enum RegisterMapError {
    #[error("reading register map {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    /// Syntax errors, unknown keys, wrong types and invalid metric names; toml's message names
    /// the key and shows the line.
    #[error("register map {origin}: {source}")]
    Parse {
        origin: String,
        source: Box<toml::de::Error>,
    },
    #[error("register map {origin}:{line}: {key}: {reason}")]
    Invalid {
        origin: String,
        /// 1-based line of the offending `[[registers]]` entry, or of the file's start.
        line: usize,
        /// The key, as a path: `registers[2].word_order` (0-based index).
        key: String,
        reason: String,
    },
}

fn default_poll_ms() -> u64 {
    DEFAULT_POLL_MS
}

/// The file as written; [`validate`] turns it into a [`RegisterMap`].
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RegisterMapFile {
    model: String,
    #[serde(default = "default_poll_ms")]
    poll_ms: u64,
    registers: Vec<toml::Spanned<RegisterFileEntry>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RegisterFileEntry {
    metric: MetricName,
    kind: RegisterKind,
    address: u16,
    #[serde(rename = "type", default)]
    register_type: Option<RegisterType>,
    #[serde(default)]
    word_order: Option<WordOrder>,
    #[serde(default)]
    scale: Option<f64>,
    #[serde(default)]
    decimals: Option<u32>,
    #[serde(default)]
    unit: Option<String>,
    #[serde(default)]
    poll_ms: Option<u64>,
}

fn line_of(text: &str, byte_offset: usize) -> usize {
    let end = byte_offset.min(text.len());
    1 + text.as_bytes()[..end]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
}

fn check_poll_ms(poll_ms: u64) -> Result<Duration, String> {
    if !(MIN_POLL_MS..=MAX_POLL_MS).contains(&poll_ms) {
        return Err(format!(
            "{poll_ms} ms is outside {MIN_POLL_MS}..={MAX_POLL_MS} ms"
        ));
    }
    Ok(Duration::from_millis(poll_ms))
}

fn validate(
    file: RegisterMapFile,
    text: &str,
    origin: &str,
) -> Result<RegisterMap, RegisterMapError> {
    let invalid = |line: usize, key: String, reason: String| RegisterMapError::Invalid {
        origin: origin.to_owned(),
        line,
        key,
        reason,
    };
    if file.model.trim().is_empty() {
        return Err(invalid(1, "model".into(), "is empty".into()));
    }
    if file.model.len() > MAX_MODEL_LEN {
        return Err(invalid(
            1,
            "model".into(),
            format!(
                "is {} bytes long; the limit is {MAX_MODEL_LEN}",
                file.model.len()
            ),
        ));
    }
    let default_period =
        check_poll_ms(file.poll_ms).map_err(|reason| invalid(1, "poll_ms".into(), reason))?;
    if file.registers.is_empty() {
        return Err(invalid(
            1,
            "registers".into(),
            "the map lists no [[registers]]".into(),
        ));
    }

    let mut registers: Vec<RegisterSpec> = Vec::with_capacity(file.registers.len());
    let mut lines: Vec<usize> = Vec::with_capacity(file.registers.len());
    let mut index_by_metric: HashMap<MetricName, usize> = HashMap::new();
    for (index, spanned_entry) in file.registers.into_iter().enumerate() {
        let line = line_of(text, spanned_entry.span().start);
        let entry = spanned_entry.into_inner();
        let key = |name: &str| format!("registers[{index}].{name}");
        let metric = entry.metric.clone();

        if let Some(&first_index) = index_by_metric.get(&metric) {
            return Err(invalid(
                line,
                key("metric"),
                format!(
                    "metric {metric:?} is already read by registers[{first_index}] (line {})",
                    lines[first_index]
                ),
            ));
        }

        let register_type = match (entry.kind.is_bit(), entry.register_type) {
            (true, None | Some(RegisterType::Bool)) => RegisterType::Bool,
            (true, Some(other)) => {
                return Err(invalid(
                    line,
                    key("type"),
                    format!(
                        "metric {metric:?}: {} registers hold single bits, so the type must be bool, not {other}",
                        entry.kind
                    ),
                ))
            }
            (false, None) => RegisterType::U16,
            (false, Some(RegisterType::Bool)) => {
                return Err(invalid(
                    line,
                    key("type"),
                    format!(
                        "metric {metric:?}: bool is for coil and discrete registers; {} registers are u16, i16, u32, i32 or f32",
                        entry.kind
                    ),
                ))
            }
            (false, Some(word_type)) => word_type,
        };

        if entry.word_order.is_some() && register_type.width() != 2 {
            return Err(invalid(
                line,
                key("word_order"),
                format!(
                    "metric {metric:?}: applies to 32-bit types only, and {register_type} is one {}",
                    if register_type == RegisterType::Bool { "bit" } else { "register" }
                ),
            ));
        }

        let scale = entry.scale.unwrap_or(1.0);
        if register_type == RegisterType::Bool
            && (entry.scale.is_some() || entry.decimals.is_some())
        {
            let name = if entry.scale.is_some() {
                "scale"
            } else {
                "decimals"
            };
            return Err(invalid(
                line,
                key(name),
                format!(
                    "metric {metric:?}: a {} register is a bool and cannot be scaled or rounded",
                    entry.kind
                ),
            ));
        }
        if !scale.is_finite() || scale == 0.0 {
            return Err(invalid(
                line,
                key("scale"),
                format!("metric {metric:?}: {scale} is not a finite, non-zero multiplier"),
            ));
        }
        if let Some(decimals) = entry.decimals {
            if decimals > MAX_DECIMALS {
                return Err(invalid(
                    line,
                    key("decimals"),
                    format!("metric {metric:?}: {decimals} is more than {MAX_DECIMALS}"),
                ));
            }
        }

        let end_address = u32::from(entry.address) + u32::from(register_type.width());
        if end_address > 0x1_0000 {
            return Err(invalid(
                line,
                key("address"),
                format!(
                    "metric {metric:?}: a {register_type} at address {} runs past the last address 65535",
                    entry.address
                ),
            ));
        }

        let poll_period = match entry.poll_ms {
            Some(poll_ms) => check_poll_ms(poll_ms).map_err(|reason| {
                invalid(line, key("poll_ms"), format!("metric {metric:?}: {reason}"))
            })?,
            None => default_period,
        };

        let spec = RegisterSpec {
            metric: metric.clone(),
            kind: entry.kind,
            address: entry.address,
            register_type,
            word_order: entry.word_order.unwrap_or_default(),
            scale,
            decimals: entry.decimals,
            unit: entry.unit,
            poll_period,
        };

        if let Some((other_index, other)) = registers.iter().enumerate().find(|(_, other)| {
            other.kind == spec.kind
                && u32::from(other.address) < spec.end_address()
                && u32::from(spec.address) < other.end_address()
        }) {
            return Err(invalid(
                line,
                key("address"),
                format!(
                    "metric {metric:?}: {} address {} overlaps registers[{other_index}] (metric {:?}, line {}) at {}..{}",
                    spec.kind,
                    spec.address,
                    other.metric,
                    lines[other_index],
                    other.address,
                    other.end_address()
                ),
            ));
        }

        index_by_metric.insert(metric, index);
        lines.push(line);
        registers.push(spec);
    }

    Ok(RegisterMap {
        model: file.model,
        registers,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const ENERGY_METER: &str = include_str!("../../examples/register-maps/energy-meter.toml");

    #[test]
    fn the_example_map_is_valid() {
        let map = RegisterMap::from_toml_str(ENERGY_METER, "energy-meter.toml")
            .unwrap_or_else(|err| panic!("{err}"));
        assert!(!map.model().is_empty());
        assert!(map.registers().len() >= 5);
        assert!(map
            .registers()
            .iter()
            .any(|register| register.register_type == RegisterType::F32
                && register.word_order == WordOrder::Little));
    }

    #[test]
    fn defaults_apply() {
        let map = RegisterMap::from_toml_str(
            r#"
model = "m"
[[registers]]
metric = "a"
kind = "holding"
address = 3
[[registers]]
metric = "b"
kind = "coil"
address = 0
poll_ms = 250
"#,
            "<inline>",
        )
        .unwrap();
        let a = &map.registers()[0];
        assert_eq!(a.register_type, RegisterType::U16);
        assert_eq!(a.word_order, WordOrder::Big);
        assert_eq!(a.scale, 1.0);
        assert_eq!(a.decimals, None);
        assert_eq!(a.poll_period, Duration::from_millis(DEFAULT_POLL_MS));
        assert!(a.yields_integer());
        let b = &map.registers()[1];
        assert_eq!(b.register_type, RegisterType::Bool);
        assert_eq!(b.poll_period, Duration::from_millis(250));
    }

    /// Each refusal names the line, the key and the reason.
    #[test]
    fn refusals_name_line_key_and_reason() {
        let check = |registers: &str, expected_parts: &[&str]| {
            let text = format!("model = \"m\"\n{registers}");
            let message = RegisterMap::from_toml_str(&text, "map.toml")
                .expect_err(registers)
                .to_string();
            for part in expected_parts {
                assert!(message.contains(part), "{message:?} lacks {part:?}");
            }
        };
        let entry = |body: &str| format!("[[registers]]\nmetric = \"a\"\n{body}\n");
        check(
            &entry("kind = \"holding\"\naddress = 0\ntype = \"u16\"\nword_order = \"little\""),
            &["map.toml:2:", "registers[0].word_order", "32-bit"],
        );
        check(
            &entry("kind = \"coil\"\naddress = 0\ntype = \"f32\""),
            &["registers[0].type", "bool"],
        );
        check(
            &entry("kind = \"input\"\naddress = 0\ntype = \"bool\""),
            &["registers[0].type"],
        );
        check(
            &entry("kind = \"holding\"\naddress = 0\nscale = 0.0"),
            &["registers[0].scale", "non-zero"],
        );
        check(
            &entry("kind = \"holding\"\naddress = 0\ndecimals = 16"),
            &["registers[0].decimals"],
        );
        check(
            &entry("kind = \"holding\"\naddress = 65535\ntype = \"f32\""),
            &["registers[0].address", "65535"],
        );
        check(
            &entry("kind = \"holding\"\naddress = 0\npoll_ms = 1"),
            &["registers[0].poll_ms", "1 ms"],
        );
        check(
            &entry("kind = \"coil\"\naddress = 0\nscale = 2.0"),
            &["registers[0].scale", "bool"],
        );
        let duplicate = format!(
            "{}{}",
            entry("kind = \"holding\"\naddress = 0"),
            entry("kind = \"holding\"\naddress = 5")
        );
        check(
            &duplicate,
            &["map.toml:6:", "registers[1].metric", "registers[0]"],
        );
        check(
            "[[registers]]\nmetric = \"a\"\nkind = \"holding\"\naddress = 0\ntype = \"u32\"\n\
             [[registers]]\nmetric = \"b\"\nkind = \"holding\"\naddress = 1\n",
            &["registers[1].address", "overlaps registers[0]", "\"a\""],
        );
        // The same address in different tables is fine: they are different registers.
        RegisterMap::from_toml_str(
            "model = \"m\"\n[[registers]]\nmetric = \"a\"\nkind = \"holding\"\naddress = 0\n\
             [[registers]]\nmetric = \"b\"\nkind = \"input\"\naddress = 0\n",
            "<inline>",
        )
        .unwrap();
    }

    #[test]
    fn parse_errors_name_the_key() {
        let check = |text: &str, expected_parts: &[&str]| {
            let message = RegisterMap::from_toml_str(text, "map.toml")
                .expect_err(text)
                .to_string();
            for part in expected_parts {
                assert!(message.contains(part), "{message:?} lacks {part:?}");
            }
        };
        check(
            "model = \"m\"\n[[registers]]\nmetric = \"a\"\nkind = \"holding\"\naddress = 0\nscael = 2\n",
            &["map.toml", "scael"],
        );
        check(
            "model = \"m\"\n[[registers]]\nmetric = \"a b\"\nkind = \"holding\"\naddress = 0\n",
            &["metric name", "' '"],
        );
        check(
            "model = \"m\"\n[[registers]]\nmetric = \"a\"\nkind = \"register\"\naddress = 0\n",
            &["register", "holding"],
        );
        check(
            "model = \"m\"\nregisters = []\n",
            &["registers", "no [[registers]]"],
        );
        check(
            "model = \"\"\n[[registers]]\nmetric = \"a\"\nkind = \"coil\"\naddress = 0\n",
            &["model", "empty"],
        );
    }
}
