//! `meshgate policy …`

use clap::Subcommand;

use crate::exit::{CliResult, Outcome};

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Placeholder until this area's commands land.
    Placeholder,
}

impl PolicyCommand {
    pub fn run(self) -> CliResult<Outcome> {
        match self {
            Self::Placeholder => Ok(Outcome::Yes),
        }
    }
}
