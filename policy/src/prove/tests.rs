//! Proofs on small real sets with the real solver. A machine without cvc5 gets it from
//! `scripts/install-cvc5.sh` (once per test process), so `cargo test` works on a fresh one.

use std::path::Path;
use std::sync::OnceLock;
use std::time::UNIX_EPOCH;

use super::*;
use crate::load::SourceFile;
use crate::tools::what_if_facts;

/// The solver, installed when missing; a test fails (never skips) if that does not work.
pub(crate) fn solver() -> Solver {
    static SOLVER: OnceLock<Result<Solver, String>> = OnceLock::new();
    let found = SOLVER.get_or_init(|| {
        if let Ok(s) = Solver::locate() {
            return Ok(s);
        }
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/install-cvc5.sh");
        let out = std::process::Command::new("bash")
            .arg(&script)
            .output()
            .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
        let path = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        if !out.status.success() || path.is_empty() {
            return Err(format!(
                "{} failed: {}",
                script.display(),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Solver::at(Path::new(&path)).map_err(|e| e.to_string())
    });
    match found {
        Ok(s) => s.clone(),
        Err(e) => panic!("the proof tests need cvc5 >= 1.3.1 and could not install it: {e}"),
    }
}

fn engine(text: &str) -> PolicyEngine {
    PolicyEngine::from_sources(
        &[SourceFile {
            name: "p.cedar".into(),
            text: text.into(),
        }],
        None,
    )
    .unwrap()
}

fn prover() -> Prover {
    Prover::new(solver())
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

const OLD: &str = r#"
@id("shop-reads-orders")
permit (principal in Namespace::"east.example/shop", action in Action::"read",
        resource == Service::"orders.shop.west")
when { context.mtls && context.path like "/v1/orders*" };

@id("checkout-writes-orders")
permit (principal == Workload::"spiffe://east.example/ns/shop/sa/checkout",
        action == Action::"POST", resource == Service::"orders.shop.west")
when { context.path == "/v1/orders" };

@id("no-admin-paths")
forbid (principal, action, resource)
when { context.path like "/admin/*" || context.path == "/admin" };
"#;

/// Decides a counterexample the way `policy check` does.
fn allowed(e: &PolicyEngine, cex: &Counterexample) -> bool {
    let facts = what_if_facts(
        &cex.principal,
        &cex.action,
        &cex.resource,
        &cex.check_context().unwrap(),
        UNIX_EPOCH,
    )
    .unwrap();
    let d = e.decide(&facts);
    assert!(!d.evaluation_failed, "{cex:?}: {:?}", d.errors);
    d.allowed
}

#[test]
fn removing_access_is_proved_to_grant_nothing_new() {
    // Reads now need a path under /v1/orders/ and HEAD/OPTIONS are gone: only less access.
    let new = engine(
        r#"
@id("shop-reads-orders")
permit (principal in Namespace::"east.example/shop", action == Action::"GET",
        resource == Service::"orders.shop.west")
when { context.mtls && context.path like "/v1/orders/*" };

@id("no-admin-paths")
forbid (principal, action, resource)
when { context.path like "/admin*" };
"#,
    );
    let proof = rt()
        .block_on(prover().no_new_access(&engine(OLD), &new))
        .unwrap();
    assert!(proof.proved(), "{:#?}", proof.findings);
    assert_eq!(
        proof.envs.len(),
        8,
        "one query per action: {:?}",
        proof.envs
    );
}

#[test]
fn new_access_is_refuted_with_a_request_the_engines_confirm() {
    // The new set lets the whole shop namespace POST, and drops `mtls` from reads.
    let new_text = OLD
        .replace(
            r#"principal == Workload::"spiffe://east.example/ns/shop/sa/checkout""#,
            r#"principal in Namespace::"east.example/shop""#,
        )
        .replace("context.mtls && ", "");
    let (old, new) = (engine(OLD), engine(&new_text));
    let proof = rt().block_on(prover().no_new_access(&old, &new)).unwrap();
    assert!(!proof.proved());
    let mut actions: Vec<&str> = proof.findings.iter().map(|f| f.action.as_str()).collect();
    actions.sort_unstable();
    assert_eq!(actions, ["GET", "HEAD", "OPTIONS", "POST"], "{proof:#?}");
    for f in &proof.findings {
        let cex = f.counterexample.as_ref().unwrap();
        assert!(cex.confirmed, "{f:#?}");
        assert!(allowed(&new, cex) && !allowed(&old, cex), "{f:#?}");
        assert_eq!(cex.resource, "orders.shop.west");
        assert!(
            cex.principal
                .starts_with("spiffe://east.example/ns/shop/sa/"),
            "{cex:?}"
        );
    }
    let post = proof.findings.iter().find(|f| f.action == "POST").unwrap();
    assert_ne!(
        post.counterexample.as_ref().unwrap().principal,
        "spiffe://east.example/ns/shop/sa/checkout"
    );
}

#[test]
fn equivalence_holds_for_a_rewrite_and_fails_for_a_change() {
    // The same rules, spelled differently.
    let rewrite = engine(
        r#"
@id("reads")
permit (principal, action in [Action::"GET", Action::"HEAD", Action::"OPTIONS"],
        resource == Service::"orders.shop.west")
when { principal in Namespace::"east.example/shop" && context.path like "/v1/orders*" && context.mtls };

@id("checkout")
permit (principal, action == Action::"POST", resource)
when { principal == Workload::"spiffe://east.example/ns/shop/sa/checkout"
       && resource == Service::"orders.shop.west" && context.path == "/v1/orders" };

@id("admin")
forbid (principal, action, resource) when { context.path like "/admin/*" };
@id("admin-root")
forbid (principal, action, resource) when { context.path == "/admin" };
"#,
    );
    let old = engine(OLD);
    let proof = rt().block_on(prover().equivalent(&old, &rewrite)).unwrap();
    assert!(proof.proved(), "{:#?}", proof.findings);

    // Reads of `/v1/orders` itself (no slash after it) are dropped: a difference in one
    // direction only.
    let narrower = engine(&OLD.replace(r#"like "/v1/orders*""#, r#"like "/v1/orders/*""#));
    let proof = rt().block_on(prover().equivalent(&old, &narrower)).unwrap();
    assert!(!proof.proved());
    for f in &proof.findings {
        assert_eq!(f.what, "the old set allows a request the new set denies");
        let cex = f.counterexample.as_ref().unwrap();
        assert!(cex.confirmed, "{f:#?}");
        assert!(allowed(&old, cex) && !allowed(&narrower, cex), "{f:#?}");
    }
}

#[test]
fn an_overflow_can_error_and_the_rewritten_policy_cannot() {
    let set = engine(
        r#"
@id("until-2100")
forbid (principal, action, resource)
when { context.time.durationSince(datetime("1970-01-01")).toMilliseconds() * 1000000
       > 4102444800000000000 };

@id("guarded")
permit (principal, action, resource)
when { context.headers.hasTag("x-env") && context.headers.getTag("x-env") == "dev" };
"#,
    );
    let proof = rt().block_on(prover().never_errors(&set)).unwrap();
    assert!(!proof.proved());
    assert!(
        proof
            .findings
            .iter()
            .all(|f| f.policy.as_deref() == Some("until-2100")),
        "{:#?}",
        proof.findings
    );
    assert_eq!(proof.findings.len(), 8, "every action can reach it");
    let f = &proof.findings[0];
    assert!(f.what.contains("a forbid: meshgate denies"), "{}", f.what);
    let cex = f.counterexample.as_ref().unwrap();
    assert!(cex.confirmed, "{f:#?}");
    assert!(cex.context["time"].as_str().unwrap() > "2262", "{cex:?}");

    let fixed = engine(
        r#"
@id("until-2100")
forbid (principal, action, resource)
when { context.time > datetime("2100-01-01") };
"#,
    );
    let proof = rt().block_on(prover().never_errors(&fixed)).unwrap();
    assert!(proof.proved(), "{:#?}", proof.findings);
}

/// A forbid that fails closed denies more than Cedar says: when a rewrite makes it stop
/// failing (here the overflow is gone, the window is the same), access grows past the
/// overflow, where Cedar alone sees two equivalent sets. The proof must not miss it.
#[test]
fn an_old_forbid_that_fails_closed_is_not_mistaken_for_no_access() {
    let old = engine(
        r#"
@id("all") permit (principal, action, resource);
@id("until-2100") forbid (principal, action, resource)
when { context.time.durationSince(datetime("1970-01-01")).toMilliseconds() * 1000000
       > 4102444800000000000 };
"#,
    );
    let new = engine(
        r#"
@id("all") permit (principal, action, resource);
@id("until-2100") forbid (principal, action, resource)
when { context.time > datetime("2100-01-01")
       && context.time.durationSince(datetime("1970-01-01")).toMilliseconds() <= 9223372036854 };
"#,
    );
    let proof = rt().block_on(prover().no_new_access(&old, &new)).unwrap();
    assert!(!proof.proved());
    assert!(
        proof.findings[0]
            .what
            .contains("forbid `until-2100` of the old set can fail"),
        "{:#?}",
        proof.findings
    );
}

#[test]
fn always_denies_holds_for_a_namespace_and_fails_for_one_with_access() {
    let set = engine(OLD);
    let batch: PrincipalPattern = "spiffe://east.example/ns/batch/*".parse().unwrap();
    let proof = rt().block_on(prover().always_denies(&set, &batch)).unwrap();
    assert!(proof.proved(), "{:#?}", proof.findings);

    let with_report = engine(&format!(
        "{OLD}\n@id(\"report\") permit (principal == Workload::\"spiffe://east.example/ns/batch/sa/report\", action == Action::\"GET\", resource);"
    ));
    let proof = rt()
        .block_on(prover().always_denies(&with_report, &batch))
        .unwrap();
    assert_eq!(proof.findings.len(), 1, "{:#?}", proof.findings);
    let cex = proof.findings[0].counterexample.as_ref().unwrap();
    assert_eq!(
        (cex.principal.as_str(), cex.action.as_str()),
        ("spiffe://east.example/ns/batch/sa/report", "GET")
    );
    assert!(cex.confirmed && allowed(&with_report, cex));
}

#[test]
fn the_mesh_model_ids_are_reserved() {
    let set = engine(r#"@id("meshgate-model/0") permit (principal, action, resource);"#);
    let err = rt().block_on(prover().never_errors(&set)).unwrap_err();
    assert!(matches!(err, ProveError::ReservedId(_)), "{err}");
}
