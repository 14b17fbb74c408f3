use std::process::ExitCode;

use clap::Parser;
use h2trace::{
    check,
    cli::{Cli, Command},
    config::{self, ConfigError},
    probe::{ProbeError, error_chain},
    run::{self, Outcome, RunError},
};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let cfg = match config::resolve(&cli.trace) {
        Ok(c) => c,
        Err(e) => return fail(&e, 2),
    };
    if let Some(Command::Check) = cli.command {
        let report = check::check(&cfg.probe);
        print!("{}", report.text);
        return ExitCode::from(if report.can_trace { 0 } else { 1 });
    }
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(&e, 1),
    };
    match rt.block_on(run::trace(cfg)) {
        Ok(Outcome::Done) => ExitCode::SUCCESS,
        Ok(Outcome::Interrupted) => ExitCode::from(130),
        Err(e @ RunError::Probe(ProbeError::Privileges(_))) => fail(&e, 1),
        Err(e) => fail(&e, 1),
    }
}

fn fail(e: &dyn std::error::Error, code: u8) -> ExitCode {
    eprintln!("h2trace: {}", error_chain(e));
    ExitCode::from(code)
}

#[allow(dead_code)]
fn _assert_config_error_is_error(e: ConfigError) -> Box<dyn std::error::Error> {
    Box::new(e)
}
