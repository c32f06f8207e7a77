//! Name globs (`*` any run of characters, `?` exactly one) that select devices and metrics for rules.

use fieldgate_shared::model::MAX_NAME_LEN;

/// A compiled device or metric glob. Names are ASCII, so matching works on bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Glob {
    pattern: Box<[u8]>,
    shape: Shape,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Shape {
    /// `*`: matches every name without looking at it.
    Any,
    /// No wildcard: plain equality.
    Exact,
    /// `prefix*` with no other wildcard, the common case (`temperature*`, `meter-*`).
    Prefix,
    /// Anything else: the general backtracking matcher.
    Wildcard,
}

impl Glob {
    /// Compiles `pattern`, refusing one that could never match a valid name.
    pub(crate) fn new(pattern: &str) -> Result<Self, String> {
        if pattern.is_empty() {
            return Err("an empty glob matches nothing; use \"*\" for every name".into());
        }
        if let Some((pos, ch)) = pattern.char_indices().find(|&(_, c)| {
            !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ':' | '*' | '?'))
        }) {
            return Err(format!(
                "{ch:?} at byte {pos} can never match a name; names use ASCII letters, digits and _ - . :, globs add * and ?"
            ));
        }
        let literal_len = pattern.bytes().filter(|&b| b != b'*').count();
        if literal_len > MAX_NAME_LEN {
            return Err(format!(
                "needs at least {literal_len} characters; names are at most {MAX_NAME_LEN}"
            ));
        }
        let bytes = pattern.as_bytes();
        let n_wildcards = bytes.iter().filter(|&&b| b == b'*' || b == b'?').count();
        let shape = if bytes.iter().all(|&b| b == b'*') {
            Shape::Any
        } else if n_wildcards == 0 {
            Shape::Exact
        } else if n_wildcards == 1 && bytes[bytes.len() - 1] == b'*' {
            Shape::Prefix
        } else {
            Shape::Wildcard
        };
        let pattern: Box<[u8]> = match shape {
            Shape::Prefix => bytes[..bytes.len() - 1].into(),
            _ => bytes.into(),
        };
        Ok(Self { pattern, shape })
    }

    pub(crate) fn is_match(&self, name: &str) -> bool {
        let name = name.as_bytes();
        match self.shape {
            Shape::Any => true,
            Shape::Exact => *self.pattern == *name,
            Shape::Prefix => name.starts_with(&self.pattern),
            Shape::Wildcard => wildcard_match(&self.pattern, name),
        }
    }
}

/// The classic linear-space matcher: on a mismatch, retry from the last `*` one byte further on.
/// Patterns and names are at most a few dozen bytes, so the worst case stays small.
fn wildcard_match(pattern: &[u8], name: &[u8]) -> bool {
    let (mut p, mut n) = (0, 0);
    let mut last_star: Option<(usize, usize)> = None;
    while n < name.len() {
        if p < pattern.len() && (pattern[p] == b'?' || pattern[p] == name[n]) {
            p += 1;
            n += 1;
        } else if p < pattern.len() && pattern[p] == b'*' {
            last_star = Some((p, n));
            p += 1;
        } else if let Some((star_p, star_n)) = last_star {
            p = star_p + 1;
            n = star_n + 1;
            last_star = Some((star_p, star_n + 1));
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|&b| b == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_match_as_documented() {
        let check = |pattern: &str, name: &str, expected: bool| {
            let glob = Glob::new(pattern).unwrap();
            assert_eq!(glob.is_match(name), expected, "{pattern} vs {name}");
        };
        check("*", "anything", true);
        check("**", "x", true);
        check("temp", "temp", true);
        check("temp", "temp2", false);
        check("temp*", "temp", true);
        check("temp*", "temperature", true);
        check("temp*", "tem", false);
        check("*.l1", "power.l1", true);
        check("*.l1", "power.l2", false);
        check("meter-??", "meter-07", true);
        check("meter-??", "meter-7", false);
        check("meter-??", "meter-007", false);
        check("a*b*c", "aXXbYYc", true);
        check("a*b*c", "aXXbYY", false);
        check("a*b?c", "abbbxc", true);
        check("*-*", "plc-1", true);
        check("?", "", false);
        check("*x", "xxxx", true);
    }

    #[test]
    fn globs_that_can_never_match_are_refused() {
        for (pattern, fragment) in [
            ("", "empty glob"),
            ("temp/*", "'/' at byte 4"),
            ("a b", "' ' at byte 1"),
            (&"x".repeat(65), "at least 65"),
        ] {
            let err = Glob::new(pattern).unwrap_err();
            assert!(err.contains(fragment), "{pattern:?}: {err}");
        }
        assert!(Glob::new(&format!("{}*", "x".repeat(64))).is_ok());
    }
}
