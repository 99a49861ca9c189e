//! SPIFFE IDs and trust domains: no panic on any input, accepted exactly when the SPIFFE ID
//! grammar says so, and whatever is accepted round-trips.

use meshgate_fuzz::{config, mutate, mutations};
use meshgate_identity::{SpiffeId, TrustDomain};
use proptest::prelude::*;

/// The SPIFFE ID standard, written independently of the parser: `spiffe://`, a trust
/// domain of `[a-z0-9._-]{1,255}`, then `/`-separated segments of `[A-Za-z0-9._-]+` that
/// are not `.` or `..`, 2048 bytes at most.
fn spec_valid_id(s: &str) -> bool {
    let Some(rest) = s.strip_prefix("spiffe://") else {
        return false;
    };
    let (td, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    s.len() <= 2048
        && spec_valid_td(td)
        && (path.is_empty()
            || path[1..].split('/').all(|seg| {
                !seg.is_empty()
                    && seg != "."
                    && seg != ".."
                    && seg
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
            }))
}

fn spec_valid_td(td: &str) -> bool {
    !td.is_empty()
        && td.len() <= 255
        && td
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
}

/// Checks every property of one input; returns whether it parsed as an ID.
fn check_id(input: &str) -> Result<bool, TestCaseError> {
    let parsed = input.parse::<SpiffeId>();
    prop_assert_eq!(
        parsed.is_ok(),
        spec_valid_id(input),
        "parser and grammar disagree on {:?}: {:?}",
        input,
        parsed
    );
    if let Ok(id) = &parsed {
        prop_assert_eq!(id.to_string(), input);
        prop_assert_eq!(&id.as_str().parse::<SpiffeId>().unwrap(), id);
        // Rebuilt from its parts, through serde, and its trust domain alone.
        prop_assert_eq!(&SpiffeId::new(id.trust_domain(), id.path()).unwrap(), id);
        let json = serde_json::to_string(id).unwrap();
        prop_assert_eq!(&serde_json::from_str::<SpiffeId>(&json).unwrap(), id);
        let td = id.trust_domain();
        prop_assert_eq!(&td.as_str().parse::<TrustDomain>().unwrap(), td);
        prop_assert_eq!(&td.id_string().parse::<TrustDomain>().unwrap(), td);
        prop_assert!(
            td.id_string()
                .parse::<SpiffeId>()
                .unwrap()
                .is_trust_domain_id()
        );
    }
    // Serde refuses exactly what `FromStr` refuses.
    let json = serde_json::to_string(input).unwrap();
    prop_assert_eq!(
        serde_json::from_str::<SpiffeId>(&json).is_ok(),
        parsed.is_ok()
    );
    check_td(input)?;
    Ok(parsed.is_ok())
}

fn check_td(input: &str) -> Result<(), TestCaseError> {
    let parsed = input.parse::<TrustDomain>();
    let bare = input.strip_prefix("spiffe://").unwrap_or(input);
    let expected = if input.starts_with("spiffe://") {
        spec_valid_id(input) && !bare.contains('/')
    } else {
        spec_valid_td(input)
    };
    prop_assert_eq!(
        parsed.is_ok(),
        expected,
        "trust domain parser and grammar disagree on {:?}: {:?}",
        input,
        parsed
    );
    if let Ok(td) = parsed {
        prop_assert_eq!(td.as_str(), bare);
        prop_assert_eq!(&td.to_string().parse::<TrustDomain>().unwrap(), &td);
        let id = SpiffeId::new(&td, "").unwrap();
        prop_assert_eq!(id.trust_domain(), &td);
    }
    Ok(())
}

const SEGMENT: &str = "[A-Za-z0-9._-]{1,12}";

/// IDs the grammar accepts (dot segments aside), of every length up to past the limits.
fn valid_looking_id() -> impl Strategy<Value = String> {
    let td = prop_oneof![
        8 => "[a-z0-9._-]{1,24}",
        1 => "[a-z0-9._-]{250,260}",
    ];
    let segments = prop_oneof![
        8 => proptest::collection::vec(SEGMENT, 0..6),
        1 => proptest::collection::vec("[a-z]{40,64}", 30..40),
    ];
    (td, segments).prop_map(|(td, segs)| {
        let mut s = format!("spiffe://{td}");
        for seg in segs {
            s.push('/');
            s.push_str(&seg);
        }
        s
    })
}

/// Characters a mutation puts in: every delimiter the grammar cares about, case, non-ASCII.
fn interesting_char() -> impl Strategy<Value = char> {
    prop_oneof![
        proptest::sample::select(
            &[
                '/', '.', ':', '@', '?', '#', '%', '-', '_', 'A', 'Z', 'a', '0', ' ', '\0', '\\',
                '\u{e9}', '\u{130}', '\u{212a}', '\u{ff0f}', '\u{200b}', '\n', '+', '~', '[',
            ][..]
        ),
        any::<char>(),
    ]
}

/// Grammar-aware edits: one segment made `.` or `..`, an extra or doubled `/`, a
/// character inserted or replaced, the scheme's case changed, a port or userinfo added.
fn near_grammar() -> impl Strategy<Value = String> {
    (
        valid_looking_id(),
        0usize..8,
        any::<usize>(),
        interesting_char(),
    )
        .prop_map(|(id, edit, pos, ch)| {
            let mut chars: Vec<char> = id.chars().collect();
            let at = pos % (chars.len() + 1);
            match edit {
                0 => chars.insert(at, ch),
                1 if at < chars.len() => chars[at] = ch,
                2 => return format!("{id}/{}", if pos % 2 == 0 { "." } else { ".." }),
                3 => return format!("{id}/"),
                4 => {
                    return id.replacen(
                        "spiffe://",
                        ["SPIFFE://", "spiffe:/", "spiffe:///"][pos % 3],
                        1,
                    );
                }
                5 => {
                    let td_end = id[9..].find('/').map_or(id.len(), |i| i + 9);
                    return if pos % 2 == 0 {
                        format!("{}:443{}", &id[..td_end], &id[td_end..])
                    } else {
                        id.replacen("spiffe://", "spiffe://u@", 1)
                    };
                }
                6 => return id.replacen('/', "//", 3 + pos % 2),
                _ => {
                    if at < chars.len() {
                        chars.remove(at);
                    }
                }
            }
            chars.into_iter().collect()
        })
}

proptest! {
    #![proptest_config(config(1500))]

    #[test]
    fn fuzz_spiffe_id_arbitrary_strings(input in any::<String>()) {
        check_id(&input)?;
    }

    #[test]
    fn fuzz_spiffe_id_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        check_id(&String::from_utf8_lossy(&bytes))?;
        let mut prefixed = b"spiffe://".to_vec();
        prefixed.extend_from_slice(&bytes);
        check_id(&String::from_utf8_lossy(&prefixed))?;
    }

    #[test]
    fn fuzz_spiffe_id_valid_ids_parse(id in valid_looking_id()) {
        prop_assert_eq!(check_id(&id)?, id.len() <= 2048 && spec_valid_id(&id));
    }

    #[test]
    fn fuzz_spiffe_id_one_mutation_from_valid(input in near_grammar()) {
        check_id(&input)?;
    }

    #[test]
    fn fuzz_spiffe_id_byte_mutations(id in valid_looking_id(), edits in mutations(3)) {
        check_id(&String::from_utf8_lossy(&mutate(id.as_bytes(), &edits)))?;
    }
}
