use rand::SeedableRng;
use rand::rngs::StdRng;

use super::*;

const CALLER: &str = "spiffe://east.example/ns/shop/sa/web";
const TESTER: &str = "spiffe://east.example/ns/qa/sa/tester";

fn routes(toml_text: &str) -> Vec<RouteConfig> {
    #[derive(serde::Deserialize)]
    struct File {
        #[serde(deserialize_with = "config::de_routes")]
        routes: Vec<RouteConfig>,
    }
    toml::from_str::<File>(toml_text).unwrap().routes
}

fn table(toml_text: &str) -> RouteTable {
    RouteTable::compile(&routes(toml_text)).unwrap()
}

fn dest(name: &str) -> Destination {
    Resolver::new("mesh", BTreeMap::new())
        .resolve(Some(name))
        .unwrap()
}

fn head(method: &str, path: &str, headers: &[(&str, &str)]) -> http::request::Parts {
    let mut b = http::Request::builder().method(method).uri(path);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(()).unwrap().into_parts().0
}

const CANARY: &str = r#"
[[routes]]
name = "orders-canary-header"
service = "orders.shop"
match = { headers = [{ name = "x-canary", exact = "1" }] }
backends = [{ cluster = "north", subset = { version = "v2" } }]

[[routes]]
name = "orders-split"
service = "orders.shop"
backends = [
  { cluster = "west", weight = 90 },
  { cluster = "north", subset = { version = "v2" }, weight = 10 },
  { cluster = "south", weight = 0 },
]
faults = [{ abort = 503, percent = 100, callers = ["spiffe://east.example/ns/qa/sa/tester"] }]
"#;

fn split(table: &RouteTable, rng: &mut impl Rng, n: usize) -> BTreeMap<String, usize> {
    let route = table
        .route_for(&dest("orders.shop.mesh"), &head("GET", "/", &[]))
        .unwrap();
    let mut counts = BTreeMap::new();
    for _ in 0..n {
        match route.pick(rng, |_| Some(())) {
            Pick::Backend(b, ()) => *counts.entry(b.label.clone()).or_default() += 1,
            other => panic!("no backend: {other:?}"),
        }
    }
    counts
}

#[test]
fn a_weighted_split_holds_within_two_points_with_a_fixed_seed() {
    let t = table(CANARY);
    let counts = split(&t, &mut StdRng::seed_from_u64(7), 2000);
    let north = counts.get("north/version=v2").copied().unwrap_or(0) as f64 / 2000.0;
    let west = counts.get("west").copied().unwrap_or(0) as f64 / 2000.0;
    assert!(
        (north - 0.10).abs() <= 0.02,
        "north share {north}: {counts:?}"
    );
    assert!((west - 0.90).abs() <= 0.02, "west share {west}: {counts:?}");
    assert!(!counts.contains_key("south"), "weight 0 drains: {counts:?}");
}

#[test]
fn the_split_measured_with_the_real_random_source() {
    // Not a fixed seed: this measures the production source. Ten runs of 2000; ±2 points is
    // ~3 standard deviations, so a run lands outside about 3 times in 1000, and 3 of 10
    // outside would be a broken source (odds ~1e-7 for a sound one).
    let t = table(CANARY);
    let mut shares = Vec::new();
    for _ in 0..10 {
        let counts = split(&t, &mut rand::rng(), 2000);
        shares.push(counts.get("north/version=v2").copied().unwrap_or(0) as f64 / 2000.0);
    }
    let within = shares.iter().filter(|s| (**s - 0.10).abs() <= 0.02).count();
    println!("north share of 2000 picks, real random source, 10 runs: {shares:?}");
    assert!(
        within >= 8,
        "only {within}/10 runs within ±2 points: {shares:?}"
    );
}

#[test]
fn routes_match_in_order_and_only_the_unpinned_name() {
    let t = table(CANARY);
    let canary = t
        .route_for(
            &dest("orders.shop.mesh"),
            &head("GET", "/", &[("x-canary", "1")]),
        )
        .unwrap();
    assert_eq!(canary.name, "orders-canary-header");
    let Pick::Backend(b, ()) = canary.pick(&mut rand::rng(), |_| Some(())) else {
        panic!("no backend")
    };
    assert_eq!(b.label, "north/version=v2");
    let plain = t
        .route_for(
            &dest("orders.shop.mesh"),
            &head("GET", "/", &[("x-canary", "2")]),
        )
        .unwrap();
    assert_eq!(plain.name, "orders-split");
    assert!(
        t.route_for(&dest("orders.shop.west.mesh"), &head("GET", "/", &[]))
            .is_none(),
        "a pinned name goes where it is pinned"
    );
    assert!(
        t.route_for(&dest("ledger.shop.mesh"), &head("GET", "/", &[]))
            .is_none()
    );
}

#[test]
fn path_prefix_and_methods_narrow_a_route() {
    let t = table(
        r#"
[[routes]]
name = "writes"
service = "orders.shop"
match = { path_prefix = "/v1/", methods = ["post"] }
backends = [{ cluster = "west" }]
"#,
    );
    let d = dest("orders.shop.mesh");
    assert!(t.route_for(&d, &head("POST", "/v1/x", &[])).is_some());
    assert!(t.route_for(&d, &head("GET", "/v1/x", &[])).is_none());
    assert!(t.route_for(&d, &head("POST", "/v2/x", &[])).is_none());
}

#[test]
fn unavailable_backends_leave_the_split_to_the_others_but_drained_ones_stay_out() {
    let t = table(CANARY);
    let route = t
        .route_for(&dest("orders.shop.mesh"), &head("GET", "/", &[]))
        .unwrap();
    let mut rng = StdRng::seed_from_u64(1);
    for _ in 0..200 {
        match route.pick(&mut rng, |b| (b.cluster != "west").then_some(())) {
            Pick::Backend(b, ()) => assert_eq!(b.cluster, "north"),
            other => panic!("{other:?}"),
        }
    }
    // Only the drained backend is reachable: nothing is.
    assert!(matches!(
        route.pick(&mut rng, |b| (b.cluster == "south").then_some(())),
        Pick::NoneAvailable
    ));
}

#[test]
fn faults_apply_only_to_their_callers() {
    let t = table(CANARY);
    let route = t
        .route_for(&dest("orders.shop.mesh"), &head("GET", "/", &[]))
        .unwrap();
    let h = http::HeaderMap::new();
    let mut rng = StdRng::seed_from_u64(3);
    let tester: SpiffeId = TESTER.parse().unwrap();
    let caller: SpiffeId = CALLER.parse().unwrap();
    let fault = route.fault(&tester, &h, &mut rng).unwrap();
    assert_eq!(fault.describe(), "abort 503");
    assert!(route.fault(&caller, &h, &mut rng).is_none());
}

#[test]
fn fault_scopes_by_namespace_header_and_percentage() {
    let t = table(
        r#"
[[routes]]
name = "chaos"
service = "orders.shop"
faults = [
  { delay = "250ms", percent = 50, namespaces = ["qa"], headers = [{ name = "x-chaos", prefix = "on" }] },
]
"#,
    );
    let route = t
        .route_for(&dest("orders.shop.mesh"), &head("GET", "/", &[]))
        .unwrap();
    let tester: SpiffeId = TESTER.parse().unwrap();
    let caller: SpiffeId = CALLER.parse().unwrap();
    let on = head("GET", "/", &[("x-chaos", "on-please")]).headers;
    let mut rng = StdRng::seed_from_u64(11);
    let hits = (0..2000)
        .filter(|_| route.fault(&tester, &on, &mut rng).is_some())
        .count();
    assert!((900..=1100).contains(&hits), "{hits} of 2000 at 50 %");
    assert!(route.fault(&caller, &on, &mut rng).is_none());
    assert!(
        route
            .fault(&tester, &http::HeaderMap::new(), &mut rng)
            .is_none()
    );
    assert_eq!(
        (0..100).find_map(|_| route.fault(&tester, &on, &mut rng).map(Fault::describe)),
        Some("delay 250ms".to_owned())
    );
    assert!(matches!(route.pick(&mut rng, |_| Some(())), Pick::Unrouted));
}

#[test]
fn mirror_percentage() {
    let t = table(
        r#"
[[routes]]
name = "shadow-traffic"
service = "orders.shop"
mirror = { cluster = "north", subset = { version = "v2" }, percent = 25 }
"#,
    );
    let route = t
        .route_for(&dest("orders.shop.mesh"), &head("GET", "/", &[]))
        .unwrap();
    let mut rng = StdRng::seed_from_u64(5);
    let copies = (0..2000)
        .filter(|_| route.mirror(&mut rng).is_some())
        .count();
    assert!((450..=550).contains(&copies), "{copies} of 2000 at 25 %");
    assert_eq!(
        route
            .mirror(&mut rng)
            .map_or("north/version=v2", |b| b.label.as_str()),
        "north/version=v2"
    );
}

#[test]
fn invalid_routes_are_refused_with_every_problem_located() {
    let errors = RouteTable::compile(&routes(
        r#"
[[routes]]
name = "a"
service = "orders"
match = { path_prefix = "v1", methods = ["GE T"], headers = [{ name = "x-meshgate-caller", exact = "x" }] }
backends = [{ cluster = "West", weight = 0 }, { cluster = "West", weight = 0 }]
faults = [{ percent = 120 }, { abort = 200 }, { abort = 503, delay = "1s" }]
retry = { attempts = 0, on = ["sometimes"], statuses = [200, 429], per_try_timeout = "5s" }
timeout = "0s"

[[routes]]
name = "a"
service = "orders.shop"
mirror = { cluster = "north", subset = { "ver sion" = "2" }, percent = -1 }
"#,
    ))
    .unwrap_err();
    let text = errors.join("\n");
    for needle in [
        "routes[0] (`a`).service: `orders` is not `<service>.<namespace>`",
        "routes[0] (`a`).match.path_prefix: must start with `/`",
        "routes[0] (`a`).match.methods: `GE T` is not an HTTP method",
        "routes[0] (`a`).match.headers[0].name: `x-meshgate-caller` headers are removed",
        "routes[0] (`a`).backends[0].cluster: `West` is not a cluster name",
        "routes[0] (`a`).backends[1]: `West` is listed twice",
        "routes[0] (`a`).backends: every weight is 0",
        "routes[0] (`a`).faults[0]: give `abort` (a status) or `delay`",
        "routes[0] (`a`).faults[0].percent: 120 is not between 0 and 100",
        "routes[0] (`a`).faults[1].abort: 200 is not an error status",
        "routes[0] (`a`).retry.attempts: 0 is not between 1 and 10",
        "routes[0] (`a`).retry.on: `sometimes` is not one of",
        "routes[0] (`a`).retry.statuses: 200 is not an error status",
        "routes[0] (`a`).retry.statuses: 429 is a refusal by a gateway",
        "routes[0] (`a`).faults[2]: give `abort` or `delay`, not both",
        "routes[0] (`a`).backends[0].cluster: `West` is not a cluster name",
        "routes[0] (`a`).timeout: must be more than 0",
        "routes[1] (`a`).name: another route has this name",
        "routes[1] (`a`).mirror.subset: `ver sion = \"2\"`",
        "routes[1] (`a`).mirror.percent: -1 is not between 0 and 100",
    ] {
        assert!(text.contains(needle), "missing `{needle}` in:\n{text}");
    }
}

#[test]
fn the_old_routes_table_points_to_aliases() {
    #[derive(Debug, serde::Deserialize)]
    #[allow(dead_code)]
    struct File {
        #[serde(deserialize_with = "config::de_routes")]
        routes: Vec<RouteConfig>,
    }
    let err = toml::from_str::<File>("[routes]\n\"legacy.internal\" = \"orders.shop.west\"\n")
        .unwrap_err()
        .to_string();
    assert!(err.contains("moved to `[aliases]`"), "{err}");
}

#[test]
fn subsets_parse_print_and_match() {
    let s = Subset::parse("version=v2, track=canary").unwrap();
    assert_eq!(s.to_string(), "track=canary,version=v2");
    let mut labels = BTreeMap::new();
    labels.insert("version".to_owned(), "v2".to_owned());
    assert!(!s.matches(&labels));
    labels.insert("track".to_owned(), "canary".to_owned());
    assert!(s.matches(&labels));
    assert!(Subset::parse("version").is_err());
    assert!(Subset::parse("version=v 2").is_err());
    assert!(Subset::parse("").unwrap().is_empty());
}

#[test]
fn retry_policies_name_what_they_retry() {
    let standard = RetryPolicy::standard(2);
    assert_eq!(standard.attempts, 3);
    assert!(standard.retries_status(StatusCode::BAD_GATEWAY));
    assert!(!standard.retries_status(StatusCode::INTERNAL_SERVER_ERROR));
    let t = table(
        r#"
[[routes]]
name = "r"
service = "orders.shop"
retry = { attempts = 4, per_try_timeout = "300ms", on = ["5xx", "timeout"], statuses = [409] }
"#,
    );
    let p = t.routes()[0].retry.clone().unwrap();
    assert_eq!(
        (p.attempts, p.per_try_timeout),
        (4, Some(Duration::from_millis(300)))
    );
    assert!(p.retries_status(StatusCode::INTERNAL_SERVER_ERROR));
    assert!(p.retries_status(StatusCode::CONFLICT));
    assert!(p.timeout && !p.reset && !p.connect_failure);
}
