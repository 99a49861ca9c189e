//! `meshgate audit …`

use clap::Subcommand;

use crate::exit::{CliResult, Outcome};

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Placeholder until this area's commands land.
    Placeholder,
}

impl AuditCommand {
    pub fn run(self) -> CliResult<Outcome> {
        match self {
            Self::Placeholder => Ok(Outcome::Yes),
        }
    }
}
