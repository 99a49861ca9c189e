//! Exit codes shared by every `meshgate` command (CONTRACTS.md):
//! 0 yes, 1 the answer is no, 2 malformed input, 3 internal or I/O failure.

use std::fmt;
use std::process::ExitCode;

/// What a command that worked concluded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Success; the answer is yes (valid, allowed, verified, all tests pass).
    Yes,
    /// The command worked and the answer is no (invalid policies, failing test, tampering).
    No,
}

impl Outcome {
    pub fn exit_code(self) -> ExitCode {
        match self {
            Outcome::Yes => ExitCode::SUCCESS,
            Outcome::No => ExitCode::from(1),
        }
    }
}

/// Why a command failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The input is malformed: a bad flag, a bad SPIFFE ID, an unreadable file format. Exit 2.
    Input,
    /// An internal or I/O failure: state unreadable, socket unreachable. Exit 3.
    Internal,
}

/// A failed command: its kind decides the exit code, the error is printed on stderr.
#[derive(Debug)]
pub struct CliError {
    kind: Kind,
    error: anyhow::Error,
}

pub type CliResult<T = Outcome> = Result<T, CliError>;

impl CliError {
    /// Malformed input (exit 2).
    pub fn input(error: impl Into<anyhow::Error>) -> Self {
        Self {
            kind: Kind::Input,
            error: error.into(),
        }
    }

    /// Internal or I/O failure (exit 3).
    pub fn internal(error: impl Into<anyhow::Error>) -> Self {
        Self {
            kind: Kind::Internal,
            error: error.into(),
        }
    }

    pub fn exit_code(&self) -> ExitCode {
        match self.kind {
            Kind::Input => ExitCode::from(2),
            Kind::Internal => ExitCode::from(3),
        }
    }

    /// Prints the error, with its causes, on stderr as `error: …: …`.
    pub fn report(&self) {
        eprintln!("error: {self}");
    }
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#}", self.error)
    }
}

/// Attach an exit-code kind to any error, with context: `read(p).input_ctx(|| format!(…))?`.
pub trait ResultExt<T> {
    fn input_err(self) -> CliResult<T>;
    fn internal_err(self) -> CliResult<T>;
    fn input_ctx<C: fmt::Display + Send + Sync + 'static>(
        self,
        ctx: impl FnOnce() -> C,
    ) -> CliResult<T>;
    fn internal_ctx<C: fmt::Display + Send + Sync + 'static>(
        self,
        ctx: impl FnOnce() -> C,
    ) -> CliResult<T>;
}

impl<T, E: Into<anyhow::Error>> ResultExt<T> for Result<T, E> {
    fn input_err(self) -> CliResult<T> {
        self.map_err(CliError::input)
    }
    fn internal_err(self) -> CliResult<T> {
        self.map_err(CliError::internal)
    }
    fn input_ctx<C: fmt::Display + Send + Sync + 'static>(
        self,
        ctx: impl FnOnce() -> C,
    ) -> CliResult<T> {
        self.map_err(|e| CliError::input(e.into().context(ctx())))
    }
    fn internal_ctx<C: fmt::Display + Send + Sync + 'static>(
        self,
        ctx: impl FnOnce() -> C,
    ) -> CliResult<T> {
        self.map_err(|e| CliError::internal(e.into().context(ctx())))
    }
}
