//! `fedmesh`: parse, set up logging, run, and turn an error into one line
//! and a non-zero exit.

use clap::{CommandFactory, FromArgMatches};
use tracing_subscriber::EnvFilter;

// The send path allocates a little per message on several threads; glibc's
// allocator spent a fifth of a gateway's CPU there, mimalloc far less.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    // The matches are kept: role settings tell flags given from defaults.
    let matches = fedmesh::cli::Cli::command().get_matches();
    let cli = match fedmesh::cli::Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(error) => error.exit(),
    };
    // The mesh logs what it does; client commands log only problems.
    let default_level = match cli.command {
        fedmesh::cli::Command::Dev(_)
        | fedmesh::cli::Command::Coordinator(_)
        | fedmesh::cli::Command::Gateway(_)
        | fedmesh::cli::Command::Notifier(_) => "info",
        _ => "warn",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_env("FEDMESH_LOG")
                .unwrap_or_else(|_| EnvFilter::new(default_level)),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let mut stdout = std::io::stdout();
    match fedmesh::cli::run(cli, &matches, &mut stdout).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
