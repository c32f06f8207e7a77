//! Unit normalisation: the unit table, and affine conversions exact to the decimal.
//!
//! A conversion is `y = x · a + b` with `a` and `b` exact rationals (°F→°C is `a = 5/9`,
//! `b = −160/9`). Sensor floats are almost always short decimals (`98.6`, `1013.25`), so a value
//! is first read back as the decimal `m / 10^s` it was parsed from (the smallest `s` ≤ 15 at which
//! that decimal rounds to exactly the same double, as the batch codec does). The result is then
//! the exact rational `(m·p + q·10^s) / (r·10^s)`, divided once, so it is the double nearest to
//! the true result: `77.9 °F` gives exactly `25.5`, `36.6 °C` exactly `97.88 °F`, `4.2 mA` exactly
//! `0.0042 A`, where naive float arithmetic gives `25.500000000000004`, `97.88000000000001` and
//! `0.004200000000000001`.
//! When the value is not a short decimal or the integers outgrow 53 bits, plain float arithmetic
//! (`x · a + b`, within an ulp or two) is used instead, and counted as not exact.

use super::config::{ConfigError, UnitSettings};

/// 2^53: integers up to this convert to f64 exactly.
const EXACT_LIMIT: u128 = 1 << 53;

const POW10_F64: [f64; 16] = [
    1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11, 1e12, 1e13, 1e14, 1e15,
];

const fn pow10(s: u32) -> i128 {
    10i128.pow(s)
}

/// The decimal `m / 10^s` that rounds to exactly `x`, with the smallest `s` ≤ 15, if there is one.
pub(crate) fn decimal_parts(x: f64) -> Option<(i64, u32)> {
    if !x.is_finite() {
        return None;
    }
    for (s, &scale) in POW10_F64.iter().enumerate() {
        let scaled = x * scale;
        if scaled.abs() >= EXACT_LIMIT as f64 {
            return None;
        }
        let m = scaled.round();
        if m / scale == x {
            return Some((m as i64, s as u32));
        }
    }
    None
}

fn gcd(mut a: u128, mut b: u128) -> u128 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// An exact fraction with a positive denominator, in lowest terms. Only used while building
/// conversions, never per reading.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Ratio {
    num: i128,
    den: i128,
}

impl Ratio {
    fn new(num: i128, den: i128) -> Option<Ratio> {
        if den == 0 {
            return None;
        }
        let sign = if den < 0 { -1 } else { 1 };
        let g = gcd(num.unsigned_abs(), den.unsigned_abs()).max(1) as i128;
        Some(Ratio {
            num: sign * num / g,
            den: sign * den / g,
        })
    }

    fn from_f64(x: f64) -> Option<Ratio> {
        let (m, s) = decimal_parts(x)?;
        Ratio::new(m as i128, pow10(s))
    }

    fn add(self, other: Ratio) -> Option<Ratio> {
        let num = self
            .num
            .checked_mul(other.den)?
            .checked_add(other.num.checked_mul(self.den)?)?;
        Ratio::new(num, self.den.checked_mul(other.den)?)
    }

    fn neg(self) -> Ratio {
        Ratio {
            num: -self.num,
            den: self.den,
        }
    }

    fn div(self, other: Ratio) -> Option<Ratio> {
        Ratio::new(
            self.num.checked_mul(other.den)?,
            self.den.checked_mul(other.num)?,
        )
    }

    fn to_f64(self) -> f64 {
        self.num as f64 / self.den as f64
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Dimension {
    Temperature,
    Pressure,
    Energy,
    Power,
    Current,
    Voltage,
    Frequency,
    Flow,
    Fraction,
    Duration,
}

impl Dimension {
    fn as_str(self) -> &'static str {
        match self {
            Dimension::Temperature => "temperature",
            Dimension::Pressure => "pressure",
            Dimension::Energy => "energy",
            Dimension::Power => "power",
            Dimension::Current => "current",
            Dimension::Voltage => "voltage",
            Dimension::Frequency => "frequency",
            Dimension::Flow => "flow",
            Dimension::Fraction => "fraction",
            Dimension::Duration => "duration",
        }
    }
}

/// A unit: `base = x · (scale_num / scale_den) + (offset_num / offset_den)`, in its dimension's
/// base unit (K, Pa, Wh, W, A, V, Hz, L/s, ratio, s).
struct UnitDef {
    names: &'static [&'static str],
    dimension: Dimension,
    scale: (i128, i128),
    offset: (i128, i128),
}

const fn unit(
    names: &'static [&'static str],
    dimension: Dimension,
    scale: (i128, i128),
) -> UnitDef {
    UnitDef {
        names,
        dimension,
        scale,
        offset: (0, 1),
    }
}

/// The unit table. The first name of each entry is the canonical one.
const UNITS: &[UnitDef] = &[
    unit(&["K", "kelvin"], Dimension::Temperature, (1, 1)),
    UnitDef {
        names: &["degC", "°C", "celsius"],
        dimension: Dimension::Temperature,
        scale: (1, 1),
        offset: (27315, 100),
    },
    // K = (°F + 459.67) · 5/9.
    UnitDef {
        names: &["degF", "°F", "fahrenheit"],
        dimension: Dimension::Temperature,
        scale: (5, 9),
        offset: (45967 * 5, 100 * 9),
    },
    unit(&["Pa"], Dimension::Pressure, (1, 1)),
    unit(&["hPa"], Dimension::Pressure, (100, 1)),
    unit(&["mbar"], Dimension::Pressure, (100, 1)),
    unit(&["kPa"], Dimension::Pressure, (1_000, 1)),
    unit(&["MPa"], Dimension::Pressure, (1_000_000, 1)),
    unit(&["bar"], Dimension::Pressure, (100_000, 1)),
    unit(&["atm"], Dimension::Pressure, (101_325, 1)),
    // psi = 0.45359237 kg · 9.80665 m/s² / (0.0254 m)², exactly.
    unit(
        &["psi"],
        Dimension::Pressure,
        (45_359_237 * 980_665, 64_516 * 100_000),
    ),
    unit(&["J"], Dimension::Energy, (1, 3_600)),
    unit(&["kJ"], Dimension::Energy, (1_000, 3_600)),
    unit(&["MJ"], Dimension::Energy, (1_000_000, 3_600)),
    unit(&["Wh"], Dimension::Energy, (1, 1)),
    unit(&["kWh"], Dimension::Energy, (1_000, 1)),
    unit(&["MWh"], Dimension::Energy, (1_000_000, 1)),
    unit(&["mW"], Dimension::Power, (1, 1_000)),
    unit(&["W"], Dimension::Power, (1, 1)),
    unit(&["kW"], Dimension::Power, (1_000, 1)),
    unit(&["MW"], Dimension::Power, (1_000_000, 1)),
    unit(&["uA", "µA"], Dimension::Current, (1, 1_000_000)),
    unit(&["mA"], Dimension::Current, (1, 1_000)),
    unit(&["A"], Dimension::Current, (1, 1)),
    unit(&["kA"], Dimension::Current, (1_000, 1)),
    unit(&["mV"], Dimension::Voltage, (1, 1_000)),
    unit(&["V"], Dimension::Voltage, (1, 1)),
    unit(&["kV"], Dimension::Voltage, (1_000, 1)),
    unit(&["Hz"], Dimension::Frequency, (1, 1)),
    unit(&["kHz"], Dimension::Frequency, (1_000, 1)),
    unit(&["rpm"], Dimension::Frequency, (1, 60)),
    unit(&["L/s"], Dimension::Flow, (1, 1)),
    unit(&["L/min"], Dimension::Flow, (1, 60)),
    unit(&["L/h"], Dimension::Flow, (1, 3_600)),
    unit(&["m3/h", "m³/h"], Dimension::Flow, (1_000, 3_600)),
    unit(&["ratio"], Dimension::Fraction, (1, 1)),
    unit(&["%", "percent"], Dimension::Fraction, (1, 100)),
    unit(&["ppm"], Dimension::Fraction, (1, 1_000_000)),
    unit(&["ms"], Dimension::Duration, (1, 1_000)),
    unit(&["s"], Dimension::Duration, (1, 1)),
    unit(&["min"], Dimension::Duration, (60, 1)),
    unit(&["h"], Dimension::Duration, (3_600, 1)),
];

fn find_unit(name: &str) -> Option<&'static UnitDef> {
    UNITS.iter().find(|unit| unit.names.contains(&name))
}

fn known_units() -> String {
    UNITS
        .iter()
        .map(|unit| unit.names[0])
        .collect::<Vec<_>>()
        .join(", ")
}

/// `y = (x·p + q) / r` over integers, kept for the exact path.
#[derive(Clone, Copy, Debug, PartialEq)]
struct ExactAffine {
    p: i128,
    q: i128,
    r: i128,
}

impl ExactAffine {
    fn new(scale: Ratio, offset: Ratio) -> Option<Self> {
        // x·(a/b) + (c/d) = (x·a·d + c·b) / (b·d)
        let p = scale.num.checked_mul(offset.den)?;
        let q = offset.num.checked_mul(scale.den)?;
        let r = scale.den.checked_mul(offset.den)?;
        let g = gcd(gcd(p.unsigned_abs(), q.unsigned_abs()), r.unsigned_abs()).max(1) as i128;
        Some(Self {
            p: p / g,
            q: q / g,
            r: r / g,
        })
    }

    /// The double nearest to `(m / 10^s)·a + b`, or `None` when the integers outgrow 53 bits.
    fn apply(&self, m: i128, s: u32) -> Option<f64> {
        let pow = pow10(s);
        let mut num = m
            .checked_mul(self.p)?
            .checked_add(self.q.checked_mul(pow)?)?;
        let mut den = self.r.checked_mul(pow)?;
        if num.unsigned_abs() > EXACT_LIMIT || den.unsigned_abs() > EXACT_LIMIT {
            let g = gcd(num.unsigned_abs(), den.unsigned_abs()).max(1) as i128;
            num /= g;
            den /= g;
            if num.unsigned_abs() > EXACT_LIMIT || den.unsigned_abs() > EXACT_LIMIT {
                return None;
            }
        }
        // Both are exact doubles, and IEEE division is correctly rounded.
        Some(num as f64 / den as f64)
    }
}

/// A compiled unit conversion.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Conversion {
    exact: Option<ExactAffine>,
    scale: f64,
    offset: f64,
}

impl Conversion {
    fn from_ratios(scale: Ratio, offset: Ratio) -> Self {
        Self {
            exact: ExactAffine::new(scale, offset),
            scale: scale.to_f64(),
            offset: offset.to_f64(),
        }
    }

    /// The conversion between two units of the table; the error is the reason, naming the
    /// offending unit and which side (`from` or `to`) it is on.
    pub(crate) fn between(from: &str, to: &str) -> Result<Self, (&'static str, String)> {
        let source = find_unit(from).ok_or_else(|| {
            (
                "from",
                format!("{from:?} is not a known unit; known: {}", known_units()),
            )
        })?;
        let target = find_unit(to).ok_or_else(|| {
            (
                "to",
                format!("{to:?} is not a known unit; known: {}", known_units()),
            )
        })?;
        if source.dimension != target.dimension {
            return Err((
                "to",
                format!(
                    "{to:?} is a {} unit but {from:?} is a {} unit",
                    target.dimension.as_str(),
                    source.dimension.as_str()
                ),
            ));
        }
        let overflow = || ("to", format!("converting {from:?} to {to:?} overflows"));
        let ratio = |(num, den): (i128, i128)| Ratio::new(num, den).ok_or_else(overflow);
        let (a1, b1) = (ratio(source.scale)?, ratio(source.offset)?);
        let (a2, b2) = (ratio(target.scale)?, ratio(target.offset)?);
        // base = x·a1 + b1 and y = (base − b2) / a2, so y = x·(a1/a2) + (b1 − b2)/a2.
        let scale = a1.div(a2).ok_or_else(overflow)?;
        let offset = b1
            .add(b2.neg())
            .and_then(|difference| difference.div(a2))
            .ok_or_else(overflow)?;
        Ok(Self::from_ratios(scale, offset))
    }

    /// `value · scale + offset`, exact when both are short decimals.
    pub(crate) fn affine(scale: f64, offset: f64) -> Self {
        match (Ratio::from_f64(scale), Ratio::from_f64(offset)) {
            (Some(scale), Some(offset)) => Self::from_ratios(scale, offset),
            _ => Self {
                exact: None,
                scale,
                offset,
            },
        }
    }

    /// Builds the conversion a `clean.units` table asks for; `None` when it asks for none.
    pub(crate) fn from_settings(
        settings: &UnitSettings,
        prefix: &str,
    ) -> Result<Option<Self>, ConfigError> {
        let key = |name: &str| format!("{prefix}.{name}");
        let named = settings.from.is_some() || settings.to.is_some();
        let explicit = settings.scale.is_some() || settings.offset.is_some();
        if named && explicit {
            return Err(ConfigError::new(
                key(if settings.scale.is_some() {
                    "scale"
                } else {
                    "offset"
                }),
                "set either from and to, or scale and offset, not both",
            ));
        }
        if named {
            let (from, to) = match (&settings.from, &settings.to) {
                (Some(from), Some(to)) => (from, to),
                (Some(_), None) => {
                    return Err(ConfigError::new(key("to"), "from is set but to is missing"))
                }
                _ => {
                    return Err(ConfigError::new(
                        key("from"),
                        "to is set but from is missing",
                    ))
                }
            };
            return Conversion::between(from, to)
                .map(Some)
                .map_err(|(side, reason)| ConfigError::new(key(side), reason));
        }
        if explicit {
            let scale = settings.scale.unwrap_or(1.0);
            let offset = settings.offset.unwrap_or(0.0);
            if !(scale.is_finite() && scale != 0.0) {
                return Err(ConfigError::new(
                    key("scale"),
                    format!("{scale} must be a finite, non-zero number"),
                ));
            }
            if !offset.is_finite() {
                return Err(ConfigError::new(
                    key("offset"),
                    format!("{offset} must be a finite number"),
                ));
            }
            return Ok(Some(Conversion::affine(scale, offset)));
        }
        Ok(None)
    }

    /// Converts a float; the flag says whether the exact path was taken.
    pub(crate) fn apply_f64(&self, x: f64) -> (f64, bool) {
        if let Some(exact) = &self.exact {
            if let Some((m, s)) = decimal_parts(x) {
                if let Some(y) = exact.apply(m as i128, s) {
                    return (y, true);
                }
            }
        }
        (x * self.scale + self.offset, false)
    }

    /// Converts an integer; the flag says whether the exact path was taken.
    pub(crate) fn apply_i64(&self, x: i64) -> (f64, bool) {
        if let Some(y) = self
            .exact
            .as_ref()
            .and_then(|exact| exact.apply(x as i128, 0))
        {
            return (y, true);
        }
        (x as f64 * self.scale + self.offset, false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimal_parts_find_the_shortest_decimal() {
        for (x, expected) in [
            (0.0, Some((0, 0))),
            (1.0, Some((1, 0))),
            (0.1, Some((1, 1))),
            (98.6, Some((986, 1))),
            (-40.25, Some((-4025, 2))),
            (1013.25, Some((101325, 2))),
            (1e-15, Some((1, 15))),
            (0.1 + 0.2, None),
            (1.0 / 3.0, None),
            (1e300, None),
            (f64::NAN, None),
        ] {
            assert_eq!(decimal_parts(x), expected, "{x}");
        }
    }

    /// Conversions promised exact: the result is bit-for-bit the double the decimal literal parses to.
    #[test]
    fn table_conversions_are_exact_to_the_decimal() {
        let cases: &[(&str, &str, f64, f64)] = &[
            ("Wh", "kWh", 1234.0, 1.234),
            ("Wh", "kWh", 1500.0, 1.5),
            ("Wh", "kWh", 0.1, 0.0001),
            ("kWh", "Wh", 1.234, 1234.0),
            ("kWh", "MWh", 12345.678, 12.345678),
            ("J", "Wh", 3600.0, 1.0),
            ("MJ", "kWh", 3.6, 1.0),
            ("degF", "degC", 98.6, 37.0),
            ("degF", "degC", 212.0, 100.0),
            ("degF", "degC", 32.0, 0.0),
            ("degF", "degC", -40.0, -40.0),
            ("degF", "degC", 0.0, -160.0 / 9.0),
            ("degF", "degC", 77.9, 25.5),
            ("degC", "degF", 37.0, 98.6),
            ("degC", "degF", 36.6, 97.88),
            ("degC", "degF", -40.0, -40.0),
            ("K", "degC", 300.15, 27.0),
            ("K", "degC", 0.0, -273.15),
            ("K", "degC", 273.15, 0.0),
            ("degC", "K", 21.5, 294.65),
            ("°C", "kelvin", -273.15, 0.0),
            ("degF", "K", 32.0, 273.15),
            ("degF", "K", -459.67, 0.0),
            ("hPa", "kPa", 1013.25, 101.325),
            ("kPa", "hPa", 101.325, 1013.25),
            ("bar", "hPa", 1.01325, 1013.25),
            ("mbar", "hPa", 1013.2, 1013.2),
            ("atm", "hPa", 1.0, 1013.25),
            ("Pa", "hPa", 101325.0, 1013.25),
            ("mA", "A", 20.0, 0.02),
            ("mA", "A", 4.2, 0.0042),
            ("A", "mA", 0.0042, 4.2),
            ("mV", "V", 3300.0, 3.3),
            ("kW", "W", 2.2, 2200.0),
            ("L/min", "m3/h", 100.0, 6.0),
            ("m3/h", "L/min", 6.0, 100.0),
            ("%", "ratio", 12.5, 0.125),
            ("ms", "s", 1500.0, 1.5),
        ];
        for &(from, to, x, expected) in cases {
            let conversion = Conversion::between(from, to).unwrap();
            let (y, exact) = conversion.apply_f64(x);
            assert!(exact, "{x} {from} -> {to} took the float path");
            assert_eq!(
                y.to_bits(),
                expected.to_bits(),
                "{x} {from} -> {to}: {y} != {expected}"
            );
        }
    }

    /// Why the exact path exists: naive float arithmetic misses these.
    #[test]
    fn naive_float_arithmetic_is_not_exact_here() {
        let naive_and_exact = [
            ((77.9f64 - 32.0) * (5.0 / 9.0), ("degF", "degC", 77.9), 25.5),
            (36.6f64 * 1.8 + 32.0, ("degC", "degF", 36.6), 97.88),
            (4.2f64 * 0.001, ("mA", "A", 4.2), 0.0042),
        ];
        for (naive, (from, to, x), expected) in naive_and_exact {
            assert_ne!(naive, expected, "naive {x} {from} -> {to}");
            let conversion = Conversion::between(from, to).unwrap();
            assert_eq!(conversion.apply_f64(x).0, expected, "{x} {from} -> {to}");
        }
    }

    #[test]
    fn inexact_conversions_stay_close() {
        // psi is not a decimal multiple of a pascal: the result is the nearest double to the
        // exact product while the integers fit in 53 bits, and within float error after that.
        let psi_in_kpa = 6.894_757_293_168_361;
        for x in [1.0, 14.5, 100.0, 12_345.678, 1e9, 0.1 + 0.2] {
            let (y, _) = Conversion::between("psi", "kPa").unwrap().apply_f64(x);
            let expected = x * psi_in_kpa;
            assert!(
                ((y - expected) / expected).abs() < 1e-15,
                "{x} psi = {y} kPa, expected {expected}"
            );
        }
        let (y, exact) = Conversion::between("Wh", "kWh")
            .unwrap()
            .apply_f64(1.0 / 3.0);
        assert!(!exact);
        assert_eq!(y, (1.0 / 3.0) * 0.001);
    }

    #[test]
    fn integers_convert_exactly() {
        let conversion = Conversion::between("Wh", "kWh").unwrap();
        assert_eq!(conversion.apply_i64(1_234_567), (1234.567, true));
        // Too many digits for 53 bits: the float path, still close.
        let (y, exact) = conversion.apply_i64(i64::MAX);
        assert!(!exact);
        let expected = i64::MAX as f64 / 1000.0;
        assert!(((y - expected) / expected).abs() < 1e-15, "{y}");
        let raw = Conversion::affine(0.1, 0.0);
        assert_eq!(raw.apply_i64(235), (23.5, true));
        let shifted = Conversion::affine(0.01, -40.0);
        assert_eq!(shifted.apply_i64(6543), (25.43, true));
        assert_eq!(shifted.apply_f64(6543.0), (25.43, true));
    }

    #[test]
    fn identity_and_overflow() {
        let same = Conversion::between("degC", "celsius").unwrap();
        assert_eq!(same.apply_f64(21.37), (21.37, true));
        let (y, _) = Conversion::between("MWh", "J")
            .unwrap()
            .apply_f64(f64::MAX / 2.0);
        assert!(y.is_infinite(), "{y}");
    }

    #[test]
    fn unknown_and_mismatched_units_name_the_side() {
        assert_eq!(Conversion::between("degX", "degC").unwrap_err().0, "from");
        assert_eq!(Conversion::between("degC", "degX").unwrap_err().0, "to");
        let (side, reason) = Conversion::between("psi", "kWh").unwrap_err();
        assert_eq!(side, "to");
        assert!(
            reason.contains("energy") && reason.contains("pressure"),
            "{reason}"
        );
    }
}
