//! `meshgate routes reload` against a real gateway process: routes from the config file are
//! swapped in, an invalid set is refused with every problem named and the old routes keep
//! serving, and each reload is an admin event. `meshgate gateway --check` refuses invalid
//! routes before anything starts.

use std::io::Write;

use crate::pair::{Pair, WEB, call, issue};
use crate::procs::{arg, interrupt, run};

const ABORT_WEB: &str = r#"
[[routes]]
name = "orders-chaos"
service = "orders.shop"
faults = [{ abort = 503, callers = ["spiffe://west.example/ns/shop/sa/web"] }]
"#;

const INVALID: &str = r#"
[[routes]]
name = "orders-chaos"
service = "orders"
faults = [{ abort = 200 }]
"#;

fn set_routes(config: &std::path::Path, base: &str, routes: &str) {
    std::fs::write(config, format!("{base}{routes}")).unwrap();
}

#[test]
fn routes_reload_swaps_valid_routes_and_refuses_invalid_ones() {
    let Pair {
        runtime: _runtime,
        tmp,
        west,
        ..
    } = Pair::new();
    let web = tmp.path().join("west-web");
    issue(&west, WEB, &web);
    let config = west.dir.join("gateway.toml");
    let base = std::fs::read_to_string(&config).unwrap();
    let mut gw = west.start();
    let host = "orders.shop.mesh";
    assert_eq!(call(&west, &web, host), "200");
    let state = arg(&west.state());

    set_routes(&config, &base, ABORT_WEB);
    let out = run(&["routes", "reload", "--state", &state]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(stdout.contains("reloaded: 1 traffic routes"), "{stdout}");
    assert_eq!(call(&west, &web, host), "503", "the fault route serves");
    // A pinned name is not the route's: it goes where it is pinned.
    assert_eq!(call(&west, &web, "orders.shop.west.mesh"), "200");

    // Invalid: refused, exit 1, every problem with its route and key; the old route serves.
    set_routes(&config, &base, INVALID);
    let out = run(&["routes", "reload", "--state", &state]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    for needle in [
        "routes[0] (`orders-chaos`).service: `orders` is not `<service>.<namespace>`",
        "routes[0] (`orders-chaos`).faults[0].abort: 200 is not an error status",
        "the gateway keeps serving its 1 routes",
    ] {
        assert!(stderr.contains(needle), "missing `{needle}` in:\n{stderr}");
    }
    assert_eq!(call(&west, &web, host), "503");

    // A TOML mistake is located by line and column.
    std::fs::write(&config, format!("{base}[[routes]]\nname = 7\n")).unwrap();
    let out = run(&["routes", "reload", "--state", &state]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("line"), "{stderr}");

    // `--check` refuses the invalid set too, with exit 2, before anything starts.
    set_routes(&config, &base, INVALID);
    let check = run(&["gateway", "--config", &arg(&config), "--check"]);
    assert_eq!(check.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&check.stderr).contains("problem(s) in `[[routes]]`"),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );

    // No routes: served again.
    let mut file = std::fs::File::create(&config).unwrap();
    file.write_all(base.as_bytes()).unwrap();
    drop(file);
    let out = run(&["routes", "reload", "--state", &state]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(call(&west, &web, host), "200");

    // Each reload is an admin event in the log.
    let out = run(&["audit", "query", &state, "--decision", "admin", "--json"]);
    let events = String::from_utf8_lossy(&out.stdout);
    assert!(
        events.matches("routes reload").count() >= 4,
        "{events}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(interrupt(&mut gw.0).success());
}
