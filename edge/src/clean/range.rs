//! Schema and range checks: the value kind a metric must have, finiteness, and [min, max].

use fieldgate_shared::Value;

use super::config::{Action, ExpectedKind, RangeSettings};

/// 2^53: the largest magnitude below which every integer converts to f64 exactly.
const F64_EXACT_INT: i64 = 1 << 53;

#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum KindCheck {
    Ok,
    /// An integer where a float is expected, converted without loss.
    Coerced(f64),
    Wrong,
}

pub(crate) fn check_kind(expected: ExpectedKind, value: &Value) -> KindCheck {
    let ok = match (expected, value) {
        (ExpectedKind::Any, _) => true,
        (ExpectedKind::Number, Value::F64(_) | Value::I64(_)) => true,
        (ExpectedKind::F64, Value::F64(_)) => true,
        (ExpectedKind::F64, Value::I64(v)) if v.unsigned_abs() <= F64_EXACT_INT as u64 => {
            return KindCheck::Coerced(*v as f64)
        }
        (ExpectedKind::I64, Value::I64(_)) => true,
        (ExpectedKind::Bool, Value::Bool(_)) => true,
        (ExpectedKind::Str, Value::Str(_)) => true,
        _ => false,
    };
    if ok {
        KindCheck::Ok
    } else {
        KindCheck::Wrong
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Bounds {
    Within,
    Below,
    Above,
}

pub(crate) fn check_bounds(settings: &RangeSettings, x: f64) -> Bounds {
    if x < settings.min {
        Bounds::Below
    } else if x > settings.max {
        Bounds::Above
    } else {
        Bounds::Within
    }
}

pub(crate) fn rejects(settings: &RangeSettings) -> bool {
    settings.action == Action::Reject
}

#[cfg(test)]
mod tests {
    use super::*;
    use fieldgate_shared::ShortStr;

    #[test]
    fn kinds() {
        let text = Value::Str(ShortStr::new("21.5").unwrap());
        let cases = [
            (ExpectedKind::Any, text.clone(), KindCheck::Ok),
            (ExpectedKind::F64, text.clone(), KindCheck::Wrong),
            (ExpectedKind::Number, text.clone(), KindCheck::Wrong),
            (ExpectedKind::Str, text, KindCheck::Ok),
            (ExpectedKind::F64, Value::F64(1.5), KindCheck::Ok),
            (ExpectedKind::F64, Value::I64(21), KindCheck::Coerced(21.0)),
            (
                ExpectedKind::F64,
                Value::I64(-(1 << 53)),
                KindCheck::Coerced(-9_007_199_254_740_992.0),
            ),
            (
                ExpectedKind::F64,
                Value::I64((1 << 53) + 1),
                KindCheck::Wrong,
            ),
            (ExpectedKind::F64, Value::Bool(true), KindCheck::Wrong),
            (ExpectedKind::I64, Value::F64(1.0), KindCheck::Wrong),
            (ExpectedKind::I64, Value::I64(1), KindCheck::Ok),
            (ExpectedKind::Number, Value::I64(1), KindCheck::Ok),
            (ExpectedKind::Number, Value::F64(1.0), KindCheck::Ok),
            (ExpectedKind::Number, Value::Bool(false), KindCheck::Wrong),
            (ExpectedKind::Bool, Value::Bool(false), KindCheck::Ok),
            (ExpectedKind::Bool, Value::I64(0), KindCheck::Wrong),
        ];
        for (expected, value, verdict) in cases {
            assert_eq!(
                check_kind(expected, &value),
                verdict,
                "{expected:?} {value:?}"
            );
        }
    }

    #[test]
    fn bounds_are_inclusive() {
        let settings = RangeSettings {
            min: -40.0,
            max: 125.0,
            ..RangeSettings::default()
        };
        for (x, expected) in [
            (-40.0, Bounds::Within),
            (125.0, Bounds::Within),
            (0.0, Bounds::Within),
            (-40.000001, Bounds::Below),
            (125.000001, Bounds::Above),
            (f64::MAX, Bounds::Above),
        ] {
            assert_eq!(check_bounds(&settings, x), expected, "{x}");
        }
        let open = RangeSettings::default();
        assert_eq!(check_bounds(&open, f64::MAX), Bounds::Within);
        assert_eq!(check_bounds(&open, f64::MIN), Bounds::Within);
    }
}
