//! `meshgate identity …`

use clap::Subcommand;

use crate::exit::{CliResult, Outcome};

#[derive(Debug, Subcommand)]
pub enum IdentityCommand {
    /// Placeholder until this area's commands land.
    Placeholder,
}

impl IdentityCommand {
    pub fn run(self) -> CliResult<Outcome> {
        match self {
            Self::Placeholder => Ok(Outcome::Yes),
        }
    }
}
