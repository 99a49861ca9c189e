//! Engine tests: real Cedar, the shipped schema, policies written as a user would.

use std::collections::BTreeMap;
use std::time::{Duration, UNIX_EPOCH};

use super::*;

pub(crate) fn facts(caller: &str, method: &str, service: &str, path: &str) -> RequestFacts {
    RequestFacts {
        caller: caller.to_owned(),
        service: service.to_owned(),
        destination_trust_domain: "west.example".to_owned(),
        method: method.to_owned(),
        raw_path: path.to_owned(),
        headers: vec![
            ("x-env".to_owned(), "prod".to_owned()),
            ("authorization".to_owned(), "Bearer s3cret".to_owned()),
        ],
        source_cluster: "east".to_owned(),
        destination_cluster: "west".to_owned(),
        mtls: true,
        time: UNIX_EPOCH + Duration::from_secs(1_700_000_000),
        claims: None,
        service_labels: BTreeMap::from([("tier".to_owned(), "gold".to_owned())]),
    }
}

const WEB: &str = "spiffe://east.example/ns/shop/sa/web";

fn src(name: &str, text: &str) -> SourceFile {
    SourceFile {
        name: name.to_owned(),
        text: text.to_owned(),
    }
}

fn engine(files: &[(&str, &str)]) -> PolicyEngine {
    let files: Vec<SourceFile> = files.iter().map(|(n, t)| src(n, t)).collect();
    PolicyEngine::from_sources(&files, None).unwrap()
}

fn load_err(files: &[(&str, &str)]) -> LoadError {
    let files: Vec<SourceFile> = files.iter().map(|(n, t)| src(n, t)).collect();
    PolicyEngine::from_sources(&files, None).unwrap_err()
}

const SHOP: &str = r#"
@id("shop-reads")
@quota("100/s burst 20")
permit (principal in Namespace::"east.example/shop", action in Action::"read", resource in Namespace::"west.example/shop");

@id("east-reads-gold")
@quota("10/s")
permit (principal in TrustDomain::"east.example", action == Action::"GET", resource)
when { resource.hasTag("tier") && resource.getTag("tier") == "gold" };

@id("no-admin")
forbid (principal, action, resource) when { context.path like "/admin/*" || context.path == "/admin" };
"#;

#[test]
fn allow_names_determining_permits_and_strictest_quota() {
    let e = engine(&[("shop.cedar", SHOP)]);
    let d = e.decide(&facts(WEB, "GET", "orders.shop.west", "/v1/orders/42"));
    assert!(d.allowed, "{d:?}");
    assert_eq!(d.reasons, ["east-reads-gold", "shop-reads"]);
    assert!(d.errors.is_empty());
    assert_eq!(d.policy_version, e.version().to_string());
    assert_eq!(d.policy_version.len(), 64);
    let q = d.quota.unwrap();
    assert_eq!(
        (q.count, q.policy_id.as_deref()),
        (10, Some("east-reads-gold"))
    );
    assert_eq!(d.normalized_path, "/v1/orders/42");
}

#[test]
fn default_deny_and_explicit_forbid() {
    let e = engine(&[("shop.cedar", SHOP)]);
    let d = e.decide(&facts(WEB, "POST", "orders.shop.west", "/v1/orders"));
    assert!(!d.allowed);
    assert!(
        d.reasons.is_empty(),
        "default deny has no determining policy"
    );
    assert_eq!(d.quota, None);
    let d = e.decide(&facts(WEB, "GET", "orders.shop.west", "/admin/users"));
    assert!(!d.allowed);
    assert_eq!(d.reasons, ["no-admin"]);
    // Another trust domain's workload is not in east.example.
    let d = e.decide(&facts(
        "spiffe://west.example/ns/shop/sa/web",
        "GET",
        "orders.shop.west",
        "/",
    ));
    assert!(!d.allowed);
}

#[test]
fn path_tricks_do_not_slip_past_the_admin_forbid() {
    let e = engine(&[("shop.cedar", SHOP)]);
    for trick in [
        "/admin/../admin",
        "/admin/../admin/x",
        "/%2e%2e/admin/x",
        "//admin/x",
        "/./admin/x",
        "/public/%2e%2e/admin/x",
        "/%61dmin/x",
        "/admin/./x?y=1",
    ] {
        let d = e.decide(&facts(WEB, "GET", "orders.shop.west", trick));
        assert!(!d.allowed, "{trick} slipped through: {d:?}");
        assert_eq!(d.reasons, ["no-admin"], "{trick}");
    }
    let d = e.decide(&facts(WEB, "GET", "orders.shop.west", "/admin%2Fusers"));
    assert!(!d.allowed && d.evaluation_failed);
    assert!(d.errors[0].contains("encoded slash"), "{:?}", d.errors);
}

#[test]
fn bad_facts_are_denied_with_the_reason() {
    let e = engine(&[("all.cedar", "permit(principal, action, resource);")]);
    let cases = [
        (
            facts("not-spiffe", "GET", "orders.shop.west", "/"),
            "caller `not-spiffe` is not a valid SPIFFE ID",
        ),
        (
            facts(WEB, "GET", "orders", "/"),
            "service `orders` is not `<service>.<namespace>.<cluster>`",
        ),
        (
            facts(WEB, "TRACE", "orders.shop.west", "/"),
            "method `TRACE` is not allowed through the mesh",
        ),
    ];
    for (f, msg) in cases {
        let d = e.decide(&f);
        assert!(!d.allowed && d.evaluation_failed);
        assert_eq!(d.errors, [msg]);
    }
    let ok = e.decide(&facts(WEB, "CONNECT", "orders.shop.west", ""));
    assert!(ok.allowed, "{ok:?}");
}

#[test]
fn headers_claims_labels_time_and_hidden_headers() {
    let e = engine(&[(
        "ctx.cedar",
        r#"
@id("prod-header")
permit (principal, action == Action::"GET", resource)
when { context.headers.hasTag("x-env") && context.headers.getTag("x-env") == "prod" };

@id("user-alice")
permit (principal, action == Action::"POST", resource)
when { context.has_claims && context.claims.hasTag("sub") && context.claims.getTag("sub") == "alice" };

@id("no-auth-header-visible")
forbid (principal, action, resource) when { context.headers.hasTag("authorization") };

@id("after-2030")
forbid (principal, action, resource) when { context.time > datetime("2030-01-01T00:00:00Z") };
"#,
    )]);
    assert_eq!(
        e.decide(&facts(WEB, "GET", "orders.shop.west", "/"))
            .reasons,
        ["prod-header"]
    );
    let mut f = facts(WEB, "POST", "orders.shop.west", "/");
    assert!(!e.decide(&f).allowed);
    f.claims = Some(BTreeMap::from([("sub".to_owned(), "alice".to_owned())]));
    assert_eq!(e.decide(&f).reasons, ["user-alice"]);
    f.time = UNIX_EPOCH + Duration::from_secs(2_000_000_000);
    assert_eq!(e.decide(&f).reasons, ["after-2030"]);
}

#[test]
fn templates_link_from_links_toml() {
    let e = engine(&[
        (
            "t.cedar",
            r#"@id("ns-may-read") permit (principal in ?principal, action in Action::"read", resource == ?resource);"#,
        ),
        (
            "links.toml",
            r#"
[[link]]
id = "shop-reads-orders"
template = "ns-may-read"
principal = 'Namespace::"east.example/shop"'
resource = 'Service::"orders.shop.west"'
"#,
        ),
    ]);
    assert_eq!(
        e.stats(),
        LoadStats {
            policies: 0,
            templates: 1,
            links: 1
        }
    );
    assert_eq!(
        e.decide(&facts(WEB, "HEAD", "orders.shop.west", "/"))
            .reasons,
        ["shop-reads-orders"]
    );
    assert!(
        !e.decide(&facts(WEB, "HEAD", "carts.shop.west", "/"))
            .allowed
    );
}

#[test]
fn validation_errors_name_file_line_column_and_help() {
    let text = "@id(\"typo\")\npermit (principal, action, resource)\nwhen { principal.namespce == \"shop\" };\n";
    let err = load_err(&[("policies/typo.cedar", text)]);
    let d = &err.diagnostics()[0];
    assert_eq!(
        (d.file.as_str(), d.line, d.column),
        ("policies/typo.cedar", Some(3), Some(8))
    );
    let shown = err.to_string();
    assert!(shown.contains("policies/typo.cedar:3:8"), "{shown}");
    assert!(shown.contains("namespce"), "{shown}");
    assert!(shown.contains("help:"), "{shown}");
}

#[test]
fn parse_errors_and_unknown_actions_are_located() {
    let err = load_err(&[(
        "a.cedar",
        "permit (principal, action, resource)\nwhen { true }\n",
    )]);
    let d = &err.diagnostics()[0];
    assert_eq!(d.file, "a.cedar");
    assert!(d.line.is_some(), "{d:?}");
    assert!(err.to_string().contains("a.cedar:"), "{err}");
    let err = load_err(&[(
        "b.cedar",
        "permit (principal, action == Action::\"GETT\", resource);",
    )]);
    assert!(err.to_string().contains("b.cedar:1:"), "{err}");
    assert!(err.to_string().contains("GETT"), "{err}");
}

#[test]
fn duplicate_ids_and_bad_quotas_are_load_errors() {
    let err = load_err(&[
        (
            "a.cedar",
            "@id(\"same\") permit (principal, action, resource);",
        ),
        (
            "b.cedar",
            "@id(\"same\") permit (principal, action, resource);",
        ),
    ]);
    let shown = err.to_string();
    assert!(shown.contains("duplicate policy id `same`"), "{shown}");
    assert!(shown.contains("b.cedar:1:5"), "{shown}");
    let err = load_err(&[(
        "q.cedar",
        "@id(\"fast\")\n@quota(\"100/d\")\npermit (principal, action, resource);",
    )]);
    let shown = err.to_string();
    assert!(
        shown.contains(
            "in policy `fast`: quota `100/d` is malformed: the period must be `s`, `m` or `h`"
        ),
        "{shown}"
    );
    assert!(shown.contains("q.cedar:2:8"), "{shown}");
    let err = load_err(&[(
        "f.cedar",
        "@quota(\"1/s\") forbid (principal, action, resource);",
    )]);
    assert!(err.to_string().contains("has no effect"), "{err}");
}

#[test]
fn bad_links_are_load_errors() {
    let t = (
        "t.cedar",
        r#"@id("tpl") permit (principal in ?principal, action, resource);"#,
    );
    let err = load_err(&[
        t,
        (
            "links.toml",
            "[[link]]\nid = \"x\"\ntemplate = \"nope\"\nprincipal = 'Namespace::\"a/b\"'\n",
        ),
    ]);
    assert!(
        err.to_string()
            .contains("cannot link template `nope` as `x`"),
        "{err}"
    );
    let err = load_err(&[
        t,
        ("links.toml", "[[link]]\nid = \"x\"\ntemplat = \"tpl\"\n"),
    ]);
    assert!(err.to_string().contains("malformed links file"), "{err}");
}

#[test]
fn shadow_set_reports_what_it_would_do() {
    let files = [src(
        "all.cedar",
        "@id(\"allow-all\") permit (principal, action, resource);",
    )];
    let shadow = [src(
        "strict.cedar",
        "@id(\"gets-only\") permit (principal, action == Action::\"GET\", resource);",
    )];
    let e = PolicyEngine::from_sources(&files, None)
        .unwrap()
        .with_shadow_sources(&shadow, None)
        .unwrap();
    let d = e.decide(&facts(WEB, "POST", "orders.shop.west", "/"));
    assert!(d.allowed, "the shadow set is never enforced");
    let s = d.shadow.unwrap();
    assert!(!s.allowed && s.differs && s.reasons.is_empty());
    let s = e
        .decide(&facts(WEB, "GET", "orders.shop.west", "/"))
        .shadow
        .unwrap();
    assert!(s.allowed && !s.differs);
    assert_eq!(s.reasons, ["gets-only"]);
    assert_eq!(
        Some(s.policy_version),
        e.shadow_version().map(|v| v.to_string())
    );
}

#[test]
fn reload_swaps_valid_sets_and_refuses_invalid_ones() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("p.cedar");
    std::fs::write(
        &file,
        "@id(\"gets\") permit (principal, action == Action::\"GET\", resource);",
    )
    .unwrap();
    let e = PolicyEngine::load(dir.path(), None).unwrap();
    let v1 = e.version();
    assert!(
        !e.decide(&facts(WEB, "POST", "orders.shop.west", "/"))
            .allowed
    );

    std::fs::write(
        &file,
        "@id(\"posts\") permit (principal, action == Action::\"POST\", resource);",
    )
    .unwrap();
    let v2 = e.reload().unwrap();
    assert_ne!(v1, v2);
    assert_eq!(
        e.decide(&facts(WEB, "POST", "orders.shop.west", "/"))
            .reasons,
        ["posts"]
    );

    std::fs::write(
        &file,
        "permit (principal, action == Action::\"POSTT\", resource);",
    )
    .unwrap();
    let err = e.reload().unwrap_err();
    assert!(err.to_string().contains("POSTT"), "{err}");
    assert_eq!(e.version(), v2, "the old set keeps serving");
    assert_eq!(e.reload_failures(), 1);
    assert!(
        e.decide(&facts(WEB, "POST", "orders.shop.west", "/"))
            .allowed
    );

    std::fs::remove_file(&file).unwrap();
    assert!(matches!(e.reload(), Err(LoadError::NoPolicies(_))));
    assert_eq!(e.reload_failures(), 2);
}

#[test]
fn the_shipped_examples_load() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/policies");
    let e = PolicyEngine::load(&dir, None).unwrap();
    assert_eq!(
        e.stats(),
        LoadStats {
            policies: 3,
            templates: 1,
            links: 1
        }
    );
}
