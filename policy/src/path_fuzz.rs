//! Property-based fuzzing of path normalization: no panic on any input; an accepted path is
//! in normal form (normalizing it again changes nothing) and holds no dot segment, no `//`,
//! no encoded separator and, unless allowed, no double encoding.

use meshgate_fuzz::config;
use proptest::prelude::*;

use super::*;

/// The characters path tricks are made of, plus a few ordinary and non-ASCII ones.
const ALPHABET: &[&str] = &[
    "/", "/", "/", ".", ".", "%", "%2e", "%2E", "%2f", "%2F", "%5c", "%25", "%32", "%35", "%3b",
    "%41", "%7e", "%00", "%zz", "%", "2", "5", "e", "F", "a", "A", "0", ";", "\\", "?", "#", "~",
    "-", "_", "é", "\u{0}", "\u{7f}", " ", "*", "..", "%2e%2e", "%252e", "%c3%a9",
];

/// A path built from the alphabet: where the tricks are.
fn trick_path() -> impl Strategy<Value = String> {
    (
        any::<bool>(),
        proptest::collection::vec(proptest::sample::select(ALPHABET), 0..40),
    )
        .prop_map(|(absolute, parts)| {
            let mut s = if absolute {
                "/".to_owned()
            } else {
                String::new()
            };
            s.extend(parts);
            s
        })
}

fn any_path() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => trick_path(),
        1 => any::<String>(),
        1 => any::<String>().prop_map(|s| format!("/{s}")),
        1 => "/[a-z./%0-9A-F]{0,64}",
        // Around the length limit.
        1 => (MAX_PATH_LEN - 8..MAX_PATH_LEN + 8).prop_map(|n| format!("/{}", "a".repeat(n - 1))),
    ]
}

/// Whether `out` is a path in normal form under `rules`.
fn check_normal_form(raw: &str, out: &str, rules: PathRules) -> Result<(), TestCaseError> {
    if out == "*" {
        prop_assert!(raw.split(['?', '#']).next() == Some("*"));
        return Ok(());
    }
    prop_assert!(out.starts_with('/'), "{out:?}");
    prop_assert!(!out.contains("//"), "{out:?}");
    prop_assert!(
        out.split('/').all(|s| s != "." && s != ".."),
        "dot segment in {out:?}"
    );
    prop_assert!(!out.contains(['?', '#', ';', '\\']), "{out:?}");
    prop_assert!(!out.chars().any(|c| c.is_ascii_control()), "{out:?}");
    // Every `%` starts an encoding in upper-case hex of a byte that must stay encoded.
    let bytes = out.as_bytes();
    for (i, b) in bytes.iter().enumerate() {
        if *b != b'%' {
            continue;
        }
        let hex = out.get(i + 1..i + 3).unwrap_or_default();
        prop_assert!(
            hex.len() == 2
                && hex
                    .bytes()
                    .all(|c| c.is_ascii_digit() || (b'A'..=b'F').contains(&c)),
            "bad encoding in {out:?}"
        );
        let byte = u8::from_str_radix(hex, 16).unwrap_or_default();
        prop_assert!(
            !is_unreserved(byte),
            "unreserved byte still encoded in {out:?}"
        );
        prop_assert!(
            !matches!(byte, b'/' | b'\\' | b';' | 0..=0x1f | 0x7f),
            "{out:?}"
        );
    }
    if !rules.allow_double_encoding {
        let upper = out.to_ascii_uppercase();
        prop_assert!(
            !upper
                .as_bytes()
                .windows(5)
                .any(|w| w[..3] == *b"%25" && w[3].is_ascii_hexdigit() && w[4].is_ascii_hexdigit()),
            "double encoding kept in {out:?}"
        );
    }
    prop_assert!(out.len() <= raw.len().max(1), "{raw:?} grew to {out:?}");
    Ok(())
}

fn check(raw: &str) -> Result<(), TestCaseError> {
    let strict = normalize_path(raw);
    let lax = normalize_path_with(raw, PathRules::allowing_double_encoding(true));
    for (result, rules) in [
        (&strict, PathRules::default()),
        (&lax, PathRules::allowing_double_encoding(true)),
    ] {
        if let Ok(out) = result {
            check_normal_form(raw, out, rules)?;
            let again = normalize_path_with(out, rules);
            prop_assert_eq!(again.as_ref(), Ok(out), "not idempotent");
        }
    }
    // Allowing double encodings only ever adds acceptances, with the same output.
    match (&strict, &lax) {
        (Ok(a), Ok(b)) => prop_assert_eq!(a, b),
        (Ok(_), Err(e)) => return Err(TestCaseError::fail(format!("lax refused {raw:?}: {e}"))),
        (Err(PathError::DoubleEncoded(_)), _) => prop_assert!(lax.is_ok()),
        (Err(a), Err(b)) => prop_assert_eq!(a, b),
        (Err(_), Ok(_)) => return Err(TestCaseError::fail(format!("only lax took {raw:?}"))),
    }
    Ok(())
}

proptest! {
    #![proptest_config(config(3000))]

    #[test]
    fn fuzz_normalize_path(raw in any_path()) {
        check(&raw)?;
        // With a query and fragment behind it, the path is the same.
        let with_query = format!("{raw}?q=%2e%2e/;x#f");
        if !raw.contains(['?', '#']) && with_query.len() <= MAX_PATH_LEN {
            prop_assert_eq!(normalize_path(&with_query).ok(), normalize_path(&raw).ok());
        }
    }
}
