//! `meshgate policy prove`, `policy diff`, `policy replay` as a gate, and the README's
//! "Changing a policy safely" workflow (`examples/ci/policy-check.sh`), run as a user runs
//! them: the real binary, real cvc5 (installed by `scripts/install-cvc5.sh` when missing).

use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;
use tempfile::TempDir;

use crate::policy_cli::{examples, meshgate, state_with_log, text};
use crate::procs::cvc5;

/// `meshgate ARGS` with `CVC5` pointing at a working solver.
fn prove(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_meshgate"))
        .args(args)
        .env("CVC5", cvc5())
        .output()
        .expect("run meshgate")
}

/// A copy of `examples/policies` with `edit` applied to `shop.cedar`.
fn edited_examples(edit: impl Fn(String) -> String) -> TempDir {
    let dir = TempDir::new().unwrap();
    for f in ["shop.cedar", "templates.cedar", "links.toml"] {
        let text = std::fs::read_to_string(examples().join("policies").join(f)).unwrap();
        let text = if f == "shop.cedar" { edit(text) } else { text };
        std::fs::write(dir.path().join(f), text).unwrap();
    }
    dir
}

fn path(p: &Path) -> String {
    p.display().to_string()
}

/// Runs a `meshgate policy check …` line exactly as `policy prove` printed it (through the
/// shell, as a user pastes it) and returns its decision.
fn run_check_line(line: &str) -> String {
    let line = line.replacen("meshgate ", "\"$MESHGATE\" ", 1);
    let out = Command::new("sh")
        .args(["-c", &format!("{line} --json")])
        .env("MESHGATE", env!("CARGO_BIN_EXE_meshgate"))
        .output()
        .unwrap();
    let (code, out, err) = text(&out);
    assert_eq!(code, 0, "{line}: {err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    v["decision"].as_str().unwrap().to_owned()
}

#[test]
fn prove_no_new_access_holds_for_a_narrowing_and_refutes_a_widening() {
    let old = path(&examples().join("policies"));
    // Narrowing: reads need `/v1/orders/` and mTLS stays; nothing new.
    let narrower =
        edited_examples(|t| t.replace(r#"like "/v1/orders*""#, r#"like "/v1/orders/*""#));
    let (code, out, err) = text(&prove(&[
        "policy",
        "prove",
        &old,
        &path(narrower.path()),
        "--no-new-access",
    ]));
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.starts_with(
            "proved: every request the new set allows, the old set allows (8 request environments"
        ),
        "{out}"
    );

    // Widening: checkout may POST anywhere in orders, not only to `/v1/orders`.
    let wider = edited_examples(|t| t.replace(r#"when { context.path == "/v1/orders" };"#, ";"));
    let new = path(wider.path());
    let (code, out, err) = text(&prove(&["policy", "prove", &old, &new, "--no-new-access"]));
    assert_eq!(code, 1, "{out}{err}");
    assert!(out.starts_with("refuted: "), "{out}");
    assert!(
        out.contains("the new set allows a request the old set denies (action POST)"),
        "{out}"
    );
    assert!(
        out.contains("counterexample (confirmed by meshgate's engines)"),
        "{out}"
    );
    let line = out
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("meshgate policy check "))
        .unwrap();
    assert!(line.contains(&format!("policy check {new} ")), "{line}");
    // Pasted as printed: NEW allows it, and the same request against OLD is denied.
    assert_eq!(run_check_line(line), "allow");
    assert_eq!(run_check_line(&line.replacen(&new, &old, 1)), "deny");

    // The JSON form carries the same request.
    let (code, out, _) = text(&prove(&[
        "policy",
        "prove",
        &old,
        &new,
        "--no-new-access",
        "--json",
    ]));
    assert_eq!(code, 1);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["proved"], false);
    let cex = &v["findings"][0]["counterexample"];
    assert_eq!(cex["action"], "POST");
    assert_eq!(
        cex["principal"],
        "spiffe://east.example/ns/shop/sa/checkout"
    );
    assert_eq!(cex["resource"], "orders.shop.west");
    assert_ne!(cex["context"]["path"], "/v1/orders");
    assert_eq!(cex["confirmed"], true);
}

#[test]
fn prove_equivalent_never_errors_and_always_denies_exit_codes() {
    let old = path(&examples().join("policies"));
    // Reformatted and commented, the same policies.
    let same = edited_examples(|t| format!("// reviewed\n{}", t.replace("  ", "    ")));
    let (code, out, err) = text(&prove(&[
        "policy",
        "prove",
        &old,
        &path(same.path()),
        "--equivalent",
    ]));
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.starts_with("proved: the old and the new set decide every request alike"),
        "{out}"
    );

    let (code, out, err) = text(&prove(&["policy", "prove", &old, "--never-errors"]));
    assert_eq!(code, 0, "{out}{err}");

    // Nanoseconds since 1970 overflow a Long in 2262: a forbid that fails there.
    let overflow = edited_examples(|t| {
        format!(
            "{t}\n@id(\"until-2100\")\nforbid (principal, action, resource)\n\
             when {{ context.time.durationSince(datetime(\"1970-01-01\")).toMilliseconds() * 1000000 > 4102444800000000000 }};\n"
        )
    });
    let (code, out, err) = text(&prove(&[
        "policy",
        "prove",
        &path(overflow.path()),
        "--never-errors",
    ]));
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        out.contains(
            "policy `until-2100` can fail to evaluate (a forbid: meshgate denies the request)"
        ),
        "{out}"
    );
    assert!(
        out.contains("counterexample (confirmed by meshgate's engines)"),
        "{out}"
    );

    let (code, out, err) = text(&prove(&[
        "policy",
        "prove",
        &old,
        "--always-denies",
        "spiffe://east.example/ns/batch/*",
    ]));
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, err) = text(&prove(&[
        "policy",
        "prove",
        &old,
        "--always-denies",
        "spiffe://east.example/ns/shop/*",
    ]));
    assert_eq!(code, 1, "{out}{err}");
    let line = out
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("meshgate policy check "))
        .unwrap();
    assert!(
        line.contains("--principal spiffe://east.example/ns/shop/sa/"),
        "{line}"
    );
    assert_eq!(run_check_line(line), "allow");

    // Malformed input is exit 2.
    let (code, _, err) = text(&prove(&[
        "policy",
        "prove",
        &old,
        "--always-denies",
        "batch",
    ]));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("principal pattern `batch`"), "{err}");
    let (code, _, err) = text(&prove(&["policy", "prove", &old, "--no-new-access"]));
    assert_eq!(code, 2, "{err}");
}

#[test]
fn prove_without_a_solver_exits_3_and_says_how_to_install_one() {
    let old = path(&examples().join("policies"));
    let home = TempDir::new().unwrap();
    let run = |envs: &[(&str, &str)]| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_meshgate"));
        cmd.args(["policy", "prove", &old, &old, "--no-new-access"])
            .env_remove("CVC5")
            .env("HOME", home.path())
            .env("XDG_DATA_HOME", home.path().join("data"))
            .env("PATH", home.path());
        for (k, v) in envs {
            cmd.env(k, v);
        }
        text(&cmd.output().unwrap())
    };
    let (code, _, err) = run(&[]);
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("no cvc5 found"), "{err}");
    assert!(
        err.contains("install it with `scripts/install-cvc5.sh`"),
        "{err}"
    );

    let (code, _, err) = run(&[("CVC5", "/nonexistent/cvc5")]);
    assert_eq!(code, 3, "{err}");
    assert!(
        err.contains("`CVC5` is set to `/nonexistent/cvc5`, which cannot be run"),
        "{err}"
    );
    assert!(err.contains("scripts/install-cvc5.sh"), "{err}");

    // Debian's cvc5 1.0.x is too old for SymCC: named, not used.
    let old_cvc5 = home.path().join("cvc5");
    std::fs::write(&old_cvc5, "#!/bin/sh\necho 'This is cvc5 version 1.0.3'\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&old_cvc5, std::fs::Permissions::from_mode(0o755)).unwrap();
    let (code, _, err) = run(&[("PATH", &format!("{}:/usr/bin:/bin", home.path().display()))]);
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("is cvc5 1.0.3, older than 1.3.1"), "{err}");
}

#[test]
fn replay_is_a_gate_with_windows_and_a_kind_filter() {
    let state = state_with_log(6); // 3 allowed GETs, 3 denied POSTs, recorded now
    let s = path(state.path());
    let same = path(&examples().join("policies"));
    let (code, out, err) = text(&meshgate(&[
        "policy",
        "replay",
        "--log",
        &s,
        "--policies",
        &same,
        "--since",
        "7d",
    ]));
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("6 requests replayed, 0 skipped (no request facts); 0 flips"),
        "{out}"
    );

    // Reads lose `/v1/orders/…`: the three GETs flip to deny.
    let strict = edited_examples(|t| t.replace(r#"like "/v1/orders*""#, r#"like "/v2/*""#));
    let strict = path(strict.path());
    let replay = |extra: &[&str]| {
        let mut args = vec!["policy", "replay", "--log", &s, "--policies", &strict];
        args.extend_from_slice(extra);
        text(&meshgate(&args))
    };
    let (code, out, _) = replay(&["--since", "7d"]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("3 flips: 3 allow -> deny, 0 deny -> allow"),
        "{out}"
    );
    let (code, out, _) = replay(&["--only", "deny-to-allow", "--json"]);
    assert_eq!(code, 0, "{out}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["flips"].as_array().unwrap().len(), 0);
    let (code, out, _) = replay(&["--only", "allow-to-deny", "--json"]);
    assert_eq!(code, 1, "{out}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["summary"]["allow_to_deny"], 3);
    // Nothing was recorded before a day ago.
    let (code, out, _) = replay(&["--until", "1d"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("0 requests replayed"), "{out}");
    let (code, _, err) = replay(&["--since", "last week"]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("`last week` is neither an RFC 3339 time"),
        "{err}"
    );
}

#[test]
fn diff_lists_added_removed_and_changed_policies() {
    let old = path(&examples().join("policies"));
    let new = edited_examples(|t| {
        t.replace(r#"@quota("10/s burst 5")"#, r#"@quota("20/s burst 5")"#)
            + "\n@id(\"report-reads\") permit (principal == Workload::\"spiffe://east.example/ns/batch/sa/report\", action == Action::\"GET\", resource);\n"
    });
    let (code, out, err) = text(&meshgate(&["policy", "diff", &old, &path(new.path())]));
    assert_eq!(code, 1, "{err}");
    assert!(out.contains("added `report-reads`:"), "{out}");
    assert!(out.contains("changed `checkout-writes-orders`:\n"), "{out}");
    assert!(
        out.contains("- @quota(\"10/s burst 5\")\n+ @quota(\"20/s burst 5\")\n"),
        "{out}"
    );
    assert!(out.ends_with("1 added, 0 removed, 1 changed\n"), "{out}");
    let (code, out, _) = text(&meshgate(&["policy", "diff", &old, &old]));
    assert_eq!(code, 0, "{out}");
}

/// The README's workflow, as the example CI job runs it: a narrowing change passes all
/// three checks; a widening one fails at the proof.
#[test]
fn the_example_ci_job_passes_a_safe_change_and_stops_an_unsafe_one() {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/ci/policy-check.sh");
    let state = state_with_log(4);
    let old = path(&examples().join("policies"));
    let job = |new: &Path, cases: Option<&Path>| {
        let mut cmd = Command::new("bash");
        cmd.arg(&script)
            .args([&old, &path(new), &path(state.path())])
            .env("MESHGATE", env!("CARGO_BIN_EXE_meshgate"))
            .env("CVC5", cvc5())
            .env_remove("CASES");
        if let Some(c) = cases {
            cmd.env("CASES", c);
        }
        text(&cmd.output().unwrap())
    };
    // Safe: admin paths are refused more widely; recorded traffic does not flip.
    let safe = edited_examples(|t| t.replace(r#"like "/admin/*""#, r#"like "/admin*""#));
    let (code, out, err) = job(safe.path(), None);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("proved: every request the new set allows"),
        "{out}"
    );
    assert!(out.contains("0 flips"), "{out}");
    assert!(out.ends_with("== all checks passed\n"), "{out}");

    // Unsafe: checkout may POST anywhere.
    let wider = edited_examples(|t| t.replace(r#"when { context.path == "/v1/orders" };"#, ";"));
    let (code, out, _) = job(wider.path(), None);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("refuted: "), "{out}");
    assert!(!out.contains("== 3."), "{out}");

    // Meant to grow: the new cases say how, and pass.
    let cases = TempDir::new().unwrap();
    let cases_file = cases.path().join("cases.toml");
    std::fs::write(
        &cases_file,
        "[[case]]\nname = \"checkout posts a refund\"\nprincipal = \"spiffe://east.example/ns/shop/sa/checkout\"\n\
         action = \"POST\"\nresource = \"orders.shop.west\"\ncontext = { path = \"/v1/orders/1/refund\" }\nexpect = \"allow\"\n",
    )
    .unwrap();
    let (code, out, err) = job(wider.path(), Some(&cases_file));
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("1 passed, 0 failed"), "{out}");
}
