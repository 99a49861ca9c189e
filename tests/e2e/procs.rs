//! Helpers for tests that drive the real `meshgate` binary as processes: run a command,
//! keep a child that is killed on drop, free ports, wait for readiness.

use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::Path;
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_meshgate");

/// How long a test waits for a process to become ready or to exit.
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// A child process, killed (and reaped) when dropped.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs `meshgate ARGS` and asserts that it succeeds.
pub fn meshgate(args: &[&str]) -> Output {
    let out = run(args);
    assert!(
        out.status.success(),
        "meshgate {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Runs `meshgate ARGS`, whatever its exit code.
pub fn run(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().unwrap()
}

/// A path as a string argument.
pub fn arg(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

pub fn free_tcp() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

pub fn free_udp() -> SocketAddr {
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// Waits until something accepts TCP connections on `addr`.
pub fn wait_listening(addr: SocketAddr) {
    let deadline = Instant::now() + READY_TIMEOUT;
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "nothing listens on {addr}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until a gateway answers on the state directory's admin socket.
pub fn wait_admin_socket(state: &Path) {
    let sock = state.join("admin.sock");
    let deadline = Instant::now() + READY_TIMEOUT;
    while std::os::unix::net::UnixStream::connect(&sock).is_err() {
        assert!(
            Instant::now() < deadline,
            "no admin socket at {}",
            sock.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Runs `cmd` to its end like `Command::output`, but fails the test (killing the process)
/// if it has not exited within [`READY_TIMEOUT`]: a regression makes the test fail, not hang.
pub fn output_within(cmd: &mut Command) -> Output {
    use std::process::Stdio;
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The pipes are read while the process runs (a chatty process never blocks on a full
    // pipe); the waiting thread hands the output over, or the deadline kills the process.
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(READY_TIMEOUT) {
        Ok(out) => out.unwrap(),
        Err(_) => {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
            panic!("{cmd:?} did not exit within {READY_TIMEOUT:?}");
        }
    }
}

/// Sends SIGINT (Ctrl-C) to `child` and waits for it to exit.
pub fn interrupt(child: &mut Child) -> std::process::ExitStatus {
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill -INT failed");
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "the process did not exit on SIGINT"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A command for a system tool the tests drive as a real client (`curl`, `openssl`, `dig`).
/// On a machine that lacks it, the project installs it once with
/// `scripts/install-test-tools.sh` (Debian packages; needs root), so `cargo test` works on a
/// fresh machine; if it still cannot be found, the test fails saying so.
pub fn tool(name: &str) -> Command {
    static INSTALL: std::sync::Once = std::sync::Once::new();
    let present = |n: &str| {
        Command::new("sh")
            .args(["-c", &format!("command -v {n}")])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if !present(name) {
        INSTALL.call_once(|| {
            let script =
                Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/install-test-tools.sh");
            let status = Command::new("bash").arg(script).status();
            eprintln!("installing test tools: {status:?}");
        });
        assert!(
            present(name),
            "`{name}` is needed by this test and could not be installed: run scripts/install-test-tools.sh as root"
        );
    }
    Command::new(name)
}

/// [`tool`] for async tests.
pub fn tokio_tool(name: &str) -> tokio::process::Command {
    tokio::process::Command::from(tool(name))
}

/// The path of a cvc5 >= 1.3.1 for `meshgate policy prove`: the one `meshgate` finds, or,
/// on a machine without one, the one `scripts/install-cvc5.sh` installs (from PyPI, into
/// `~/.local/share/meshgate/cvc5`), once per test process. A test fails if neither works.
pub fn cvc5() -> String {
    static FOUND: std::sync::OnceLock<Result<String, String>> = std::sync::OnceLock::new();
    let found = FOUND.get_or_init(|| {
        if let Ok(s) = meshgate_policy::Solver::locate() {
            return Ok(s.path().display().to_string());
        }
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/install-cvc5.sh");
        let out = Command::new("bash")
            .arg(&script)
            .output()
            .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
        let path = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        if out.status.success() && !path.is_empty() {
            Ok(path)
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    });
    match found {
        Ok(p) => p.clone(),
        Err(e) => panic!("the proof tests need cvc5 >= 1.3.1; scripts/install-cvc5.sh failed: {e}"),
    }
}

/// Headless Chromium loading `url` and printing the DOM as it rendered it (what a person
/// sees, parsed by a real browser). Fails the test, saying why, when Chromium is missing and
/// cannot be installed (`scripts/install-test-tools.sh` installs Debian's `chromium`).
pub fn chromium_dom(url: &str) -> String {
    let out = chromium(&["--dump-dom", url]);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Headless Chromium saving a screenshot of `url` to `png`.
pub fn chromium_screenshot(url: &str, png: &Path, width: u32, height: u32) {
    let shot = format!("--screenshot={}", png.display());
    let size = format!("--window-size={width},{height}");
    chromium(&["--hide-scrollbars", &size, &shot, url]);
    assert!(png.is_file(), "chromium wrote no screenshot of {url}");
}

fn chromium(args: &[&str]) -> Output {
    let profile = tempfile::tempdir().unwrap();
    let mut cmd = tool("chromium");
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
    ])
    .arg(format!("--user-data-dir={}", profile.path().display()))
    .args(args);
    let out = output_within(&mut cmd);
    assert!(
        out.status.success(),
        "chromium {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}
