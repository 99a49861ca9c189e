//! Finding the SMT solver (cvc5 >= 1.3.1) and starting it.
//!
//! Looked for, in order: the `CVC5` environment variable (a path; used as given, so a wrong
//! one is an error rather than silently skipped), `cvc5` on the `PATH`, and the place
//! `scripts/install-cvc5.sh` installs to, `${XDG_DATA_HOME:-$HOME/.local/share}/meshgate/cvc5/bin/cvc5`.
//! A candidate must answer `--version` with version 1.3.1 or newer: Debian's `cvc5` package
//! (1.0.x) is too old for SymCC's encoding.

use std::ffi::OsString;
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Command;

use cedar_policy_symcc::solver::LocalSolver;

use super::ProveError;

/// The oldest cvc5 SymCC's encoding works with.
pub const MIN_CVC5: (u32, u32, u32) = (1, 3, 1);

/// What to run to install the solver, said in every "solver missing" error.
pub const INSTALL_HINT: &str = "install it with `scripts/install-cvc5.sh` (from the meshgate repository; \
     it puts cvc5 >= 1.3.1 from PyPI in ~/.local/share/meshgate/cvc5), or set `CVC5` to a cvc5 >= 1.3.1 executable";

/// A located cvc5 executable and its version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Solver {
    path: PathBuf,
    version: (u32, u32, u32),
    /// Per-query time limit in milliseconds (`--tlimit-per`).
    limit_ms: u64,
}

impl Solver {
    /// Finds cvc5 as the module docs say.
    pub fn locate() -> Result<Self, ProveError> {
        let home = std::env::var_os("HOME");
        let xdg = std::env::var_os("XDG_DATA_HOME");
        Self::locate_in(
            std::env::var_os("CVC5"),
            std::env::var_os("PATH"),
            default_install(xdg, home),
        )
    }

    /// The cvc5 at `path`, checked like the ones [`Self::locate`] finds.
    pub fn at(path: &Path) -> Result<Self, ProveError> {
        Self::probe(path).map_err(|why| ProveError::SolverMissing {
            detail: format!("`{}` {why}", path.display()),
        })
    }

    /// [`Self::locate`] with its inputs given (tests).
    fn locate_in(
        env: Option<OsString>,
        path: Option<OsString>,
        installed: Option<PathBuf>,
    ) -> Result<Self, ProveError> {
        if let Some(given) = env.filter(|v| !v.is_empty()) {
            return Self::probe(Path::new(&given)).map_err(|why| ProveError::SolverMissing {
                detail: format!(
                    "`CVC5` is set to `{}`, which {why}",
                    given.to_string_lossy()
                ),
            });
        }
        let mut seen = Vec::new();
        let on_path = path
            .iter()
            .flat_map(std::env::split_paths)
            .map(|dir| dir.join("cvc5"))
            .find(|p| p.is_file());
        for candidate in on_path.into_iter().chain(installed) {
            if !candidate.is_file() {
                continue;
            }
            match Self::probe(&candidate) {
                Ok(solver) => return Ok(solver),
                Err(why) => seen.push(format!("`{}` {why}", candidate.display())),
            }
        }
        let detail = if seen.is_empty() {
            "no cvc5 found (`CVC5` is not set, none on the PATH, none installed)".to_owned()
        } else {
            format!("no usable cvc5: {}", seen.join("; "))
        };
        Err(ProveError::SolverMissing { detail })
    }

    /// Runs `PATH --version` and checks the version.
    fn probe(path: &Path) -> Result<Self, String> {
        let out = Command::new(path)
            .arg("--version")
            .output()
            .map_err(|e| format!("cannot be run ({e})"))?;
        let text = String::from_utf8_lossy(&out.stdout);
        let version = parse_version(&text).ok_or_else(|| {
            format!(
                "did not print a cvc5 version (`{}`)",
                text.lines().next().unwrap_or_default().trim()
            )
        })?;
        if version < MIN_CVC5 {
            let (a, b, c) = version;
            return Err(format!("is cvc5 {a}.{b}.{c}, older than 1.3.1"));
        }
        Ok(Self {
            path: path.to_path_buf(),
            version,
            limit_ms: 60_000,
        })
    }

    /// Sets the per-query time limit (a query that takes longer is an error, not a proof).
    pub fn with_limit_ms(mut self, limit_ms: u64) -> Self {
        self.limit_ms = limit_ms.max(1);
        self
    }

    /// The executable.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Starts a solver process; SymCC talks SMT-LIB to it on stdin/stdout.
    pub(crate) fn start(&self) -> Result<LocalSolver, ProveError> {
        let mut cmd = tokio::process::Command::new(&self.path);
        cmd.args(["--lang", "smt"])
            .arg(format!("--tlimit-per={}", self.limit_ms))
            .kill_on_drop(true);
        LocalSolver::from_command(&mut cmd).map_err(|e| ProveError::SolverFailed {
            detail: format!("cannot start `{}`: {e}", self.path.display()),
        })
    }
}

impl fmt::Display for Solver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (a, b, c) = self.version;
        write!(f, "cvc5 {a}.{b}.{c} ({})", self.path.display())
    }
}

/// `${XDG_DATA_HOME:-$HOME/.local/share}/meshgate/cvc5/bin/cvc5`.
fn default_install(xdg: Option<OsString>, home: Option<OsString>) -> Option<PathBuf> {
    let data = match xdg.filter(|v| !v.is_empty()) {
        Some(x) => PathBuf::from(x),
        None => PathBuf::from(home.filter(|v| !v.is_empty())?).join(".local/share"),
    };
    Some(data.join("meshgate/cvc5/bin/cvc5"))
}

/// The `X.Y.Z` after `version ` in `cvc5 --version` output.
fn parse_version(text: &str) -> Option<(u32, u32, u32)> {
    let (_, rest) = text.split_once("version ")?;
    let digits: String = rest
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    let mut parts = digits.split('.').map(|p| p.parse::<u32>().ok());
    let major = parts.next().flatten()?;
    let minor = parts.next().flatten().unwrap_or(0);
    let patch = parts.next().flatten().unwrap_or(0);
    Some((major, minor, patch))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_parse_from_both_banners() {
        assert_eq!(
            parse_version("This is cvc5 version 1.3.1 [git tag 1.3.1 branch HEAD]"),
            Some((1, 3, 1))
        );
        assert_eq!(
            parse_version("This is cvc5 version 1.4.2 (Python bindings, meshgate shim)\n"),
            Some((1, 4, 2))
        );
        assert_eq!(parse_version("This is cvc5 version 1.0.3"), Some((1, 0, 3)));
        assert_eq!(parse_version("z3 4.12"), None);
    }

    #[test]
    fn the_default_install_follows_xdg_then_home() {
        assert_eq!(
            default_install(Some("/x".into()), Some("/h".into())),
            Some(PathBuf::from("/x/meshgate/cvc5/bin/cvc5"))
        );
        assert_eq!(
            default_install(None, Some("/h".into())),
            Some(PathBuf::from("/h/.local/share/meshgate/cvc5/bin/cvc5"))
        );
        assert_eq!(default_install(None, None), None);
    }

    #[test]
    fn missing_or_too_old_solvers_are_named_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let err = Solver::locate_in(None, Some(dir.path().into()), None).unwrap_err();
        assert!(err.to_string().contains("no cvc5 found"), "{err}");
        assert!(err.to_string().contains("install-cvc5.sh"), "{err}");

        let old = dir.path().join("cvc5");
        std::fs::write(&old, "#!/bin/sh\necho 'This is cvc5 version 1.0.3'\n").unwrap();
        make_executable(&old);
        let err = Solver::locate_in(None, Some(dir.path().into()), None).unwrap_err();
        assert!(err.to_string().contains("older than 1.3.1"), "{err}");

        let err = Solver::locate_in(Some(dir.path().join("nope").into()), None, None).unwrap_err();
        assert!(err.to_string().contains("`CVC5` is set to"), "{err}");
    }

    fn make_executable(path: &Path) {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
}
