//! Shared pieces of meshgate's property-based fuzz tests: the case count, byte mutations of
//! a valid input, and generated JSON.
//!
//! Every crate runs its fuzz properties as ordinary `#[test]`s with proptest, so `cargo test`
//! tries a bounded number of inputs per target. A longer run sets `MESHGATE_FUZZ_CASES`:
//!
//! ```text
//! MESHGATE_FUZZ_CASES=100000 cargo test -p meshgate-identity fuzz
//! ```
//!
//! The variable replaces every target's default case count; anything that is not a positive
//! integer is ignored (the default stays).

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use serde_json::Value;

pub use proptest;

/// The environment variable that sets the number of cases for every fuzz target.
pub const CASES_VAR: &str = "MESHGATE_FUZZ_CASES";

/// The number of cases to run: `MESHGATE_FUZZ_CASES` when it holds a positive integer,
/// otherwise `default` (sized so the target stays fast in a debug `cargo test`).
pub fn cases(default: u32) -> u32 {
    parse_cases(std::env::var(CASES_VAR).ok().as_deref()).unwrap_or(default)
}

/// A proptest configuration running [`cases`]`(default)` cases.
///
/// Failures are not persisted to files: a failing input is printed (shrunk) and belongs in
/// a regression test next to the fix.
pub fn config(default: u32) -> Config {
    let cases = cases(default);
    Config {
        cases,
        // Generators filter a few inputs out (a header value with a control character);
        // the reject budgets grow with the case count so a long run is not cut short.
        max_global_rejects: cases.saturating_mul(4).max(1024),
        max_local_rejects: cases.saturating_mul(64).max(65_536),
        failure_persistence: None,
        ..Config::default()
    }
}

/// A test runner with [`config`]`(default)`, for properties over an expensive fixture (an
/// issuer, a federation) built once outside the closure.
pub fn runner(default: u32) -> TestRunner {
    TestRunner::new(config(default))
}

fn parse_cases(value: Option<&str>) -> Option<u32> {
    value?.trim().parse().ok().filter(|n| *n > 0)
}

/// One edit of a byte string; positions are taken modulo the length.
#[derive(Debug, Clone)]
pub enum Mutation {
    /// Flip one bit.
    FlipBit(usize, u8),
    /// Overwrite one byte.
    Set(usize, u8),
    /// Insert one byte.
    Insert(usize, u8),
    /// Delete one byte.
    Delete(usize),
    /// Cut the input at a position.
    Truncate(usize),
    /// Repeat a short range right after itself.
    Duplicate(usize, usize),
    /// Swap two bytes.
    Swap(usize, usize),
}

/// Between one and `max` mutations (mostly one: a valid input with one thing wrong).
pub fn mutations(max: usize) -> impl Strategy<Value = Vec<Mutation>> {
    let one = prop_oneof![
        3 => (any::<usize>(), 0u8..8).prop_map(|(p, b)| Mutation::FlipBit(p, b)),
        2 => (any::<usize>(), any::<u8>()).prop_map(|(p, b)| Mutation::Set(p, b)),
        1 => (any::<usize>(), any::<u8>()).prop_map(|(p, b)| Mutation::Insert(p, b)),
        1 => any::<usize>().prop_map(Mutation::Delete),
        1 => any::<usize>().prop_map(Mutation::Truncate),
        1 => (any::<usize>(), 1usize..16).prop_map(|(p, n)| Mutation::Duplicate(p, n)),
        1 => (any::<usize>(), any::<usize>()).prop_map(|(a, b)| Mutation::Swap(a, b)),
    ];
    proptest::collection::vec(one, 1..=max.max(1))
}

/// `input` with `edits` applied in order.
pub fn mutate(input: &[u8], edits: &[Mutation]) -> Vec<u8> {
    let mut out = input.to_vec();
    for edit in edits {
        let len = out.len();
        let at = |p: usize| if len == 0 { 0 } else { p % len };
        match *edit {
            Mutation::FlipBit(p, bit) if len > 0 => out[at(p)] ^= 1 << (bit % 8),
            Mutation::Set(p, b) if len > 0 => out[at(p)] = b,
            Mutation::Insert(p, b) => out.insert(p % (len + 1), b),
            Mutation::Delete(p) if len > 0 => {
                out.remove(at(p));
            }
            Mutation::Truncate(p) => out.truncate(p % (len + 1)),
            Mutation::Duplicate(p, n) if len > 0 => {
                let start = at(p);
                let end = (start + n).min(len);
                let copy = out[start..end].to_vec();
                out.splice(end..end, copy);
            }
            Mutation::Swap(a, b) if len > 0 => out.swap(at(a), at(b)),
            _ => {}
        }
    }
    out
}

/// Numbers as JSON carries them, the odd ones included: huge, negative, fractional,
/// exponents, beyond `u64`.
pub fn json_number() -> impl Strategy<Value = Value> {
    prop_oneof![
        any::<u64>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        Just(Value::from(u64::MAX)),
        Just(Value::from(i64::MIN)),
        Just(Value::from(0)),
        // Beyond u64: serde_json reads these as f64.
        Just(serde_json::json!(1.8446744073709552e19)),
        Just(serde_json::json!(1e308)),
        Just(serde_json::json!(-0.0)),
    ]
}

/// A JSON string from `words` (names a parser looks for) or random text.
pub fn json_string(words: &'static [&'static str]) -> impl Strategy<Value = String> {
    prop_oneof![
        2 => proptest::sample::select(words).prop_map(str::to_owned),
        1 => any::<String>(),
        1 => "[ -~]{0,24}",
    ]
}

/// Any JSON value up to `depth` levels of arrays and objects, with keys and strings drawn
/// partly from `words` so the generator reaches the fields a parser reads.
pub fn json_value(words: &'static [&'static str], depth: u32) -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        json_number(),
        json_string(words).prop_map(Value::String),
    ];
    leaf.prop_recursive(depth, 96, 8, move |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
            proptest::collection::vec((json_string(words), inner), 0..8)
                .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

/// Text nested `depth` times in arrays or objects, past any recursion limit a parser may have.
pub fn deep_nesting(max_depth: usize) -> impl Strategy<Value = String> {
    (0..=max_depth, any::<bool>(), any::<bool>()).prop_map(|(depth, objects, closed)| {
        let (open, close) = if objects {
            (r#"{"keys":"#, "}")
        } else {
            ("[", "]")
        };
        let mut s = open.repeat(depth);
        s.push_str("null");
        if closed {
            s.push_str(&close.repeat(depth));
        }
        s
    })
}

#[cfg(test)]
mod tests {
    use super::{Mutation, mutate, parse_cases};

    #[test]
    fn the_variable_overrides_the_default_only_with_a_positive_count() {
        assert_eq!(parse_cases(Some("100000")), Some(100_000));
        assert_eq!(parse_cases(Some(" 42 ")), Some(42));
        assert_eq!(parse_cases(Some("0")), None);
        assert_eq!(parse_cases(Some("many")), None);
        assert_eq!(parse_cases(None), None);
    }

    #[test]
    fn mutations_stay_in_bounds_even_on_empty_input() {
        assert_eq!(
            mutate(b"", &[Mutation::Delete(7), Mutation::FlipBit(3, 1)]),
            b""
        );
        assert_eq!(mutate(b"", &[Mutation::Insert(9, b'x')]), b"x");
        assert_eq!(mutate(b"abc", &[Mutation::FlipBit(4, 0)]), b"acc");
        assert_eq!(mutate(b"abc", &[Mutation::Duplicate(1, 5)]), b"abcbc");
        assert_eq!(mutate(b"abc", &[Mutation::Truncate(2)]), b"ab");
    }
}
