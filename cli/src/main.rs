//! The `tether` command: `tether load` (the main job), `tether serve` and
//! `tether conformance`.
//!
//! Exit codes: 0 success, 1 a broken invariant or failed check, 2 bad arguments.

use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use tether_cli::conformance::{self, ConformanceArgs};
use tether_cli::engine::StartError;
use tether_cli::load::{self, LoadArgs};
use tether_cli::serve::{self, ServeArgs, ServeError};

/// tether: the request-lifecycle layer between an LLM engine and whatever serves it.
#[derive(Debug, Parser)]
#[command(name = "tether", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    Load(Box<LoadArgs>),
    Serve(Box<ServeArgs>),
    Conformance(ConformanceArgs),
}

fn main() -> ExitCode {
    // Usage errors exit with code 2 (clap's convention, and ours).
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    tether_cli::quiet_chaos_panics();
    match cli.command {
        Command::Load(args) => {
            let misplaced = matches
                .subcommand_matches("load")
                .map(load::misplaced_flags)
                .unwrap_or_default();
            load_main(&args, &misplaced)
        }
        Command::Serve(args) => serve_main(&args),
        Command::Conformance(args) => conformance_main(&args),
    }
}

fn load_main(args: &LoadArgs, misplaced: &[&str]) -> ExitCode {
    match args.to_url_options(misplaced) {
        Ok(Some(opts)) => return url_main(args, &opts),
        Ok(None) => {}
        Err(err) => {
            eprintln!("tether load: error: {err}");
            return usage_or_failure(err.is_usage());
        }
    }
    let run = args.to_options_with_note().and_then(|(opts, note)| {
        if let Some(note) = note {
            eprintln!("tether load: {note}");
        }
        load::run(&opts, !args.no_progress && !args.json)
    });
    match run {
        Ok(report) => print_report(&report, args.json, report.passed(), || report.table()),
        Err(err) => {
            eprintln!("tether load: error: {err}");
            usage_or_failure(err.is_usage())
        }
    }
}

fn url_main(args: &LoadArgs, opts: &load::http::UrlOptions) -> ExitCode {
    match load::http::run_url(opts, !args.no_progress && !args.json) {
        Ok(report) => print_report(&report, args.json, report.passed(), || report.table()),
        Err(err) => {
            eprintln!("tether load: error: {err}");
            usage_or_failure(err.is_usage())
        }
    }
}

/// Print a load report (`--json` or its table); success when it `passed`.
fn print_report(
    report: &impl serde::Serialize,
    json: bool,
    passed: bool,
    table: impl FnOnce() -> String,
) -> ExitCode {
    if json {
        match serde_json::to_string_pretty(report) {
            Ok(json) => println!("{json}"),
            Err(e) => {
                eprintln!("tether load: cannot write the report: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        print!("{}", table());
    }
    if passed {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn serve_main(args: &ServeArgs) -> ExitCode {
    match serve::run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(ServeError::EngineStart(source)) => {
            let err = StartError::of(args.engine.device, source);
            eprintln!("tether serve: error: {err}");
            usage_or_failure(err.is_usage())
        }
        Err(err) => {
            eprintln!("tether serve: error: {err}");
            let usage = match &err {
                ServeError::InvalidOptions(_) => true,
                ServeError::EngineBuild(e) => e.is_usage(),
                _ => false,
            };
            usage_or_failure(usage)
        }
    }
}

fn conformance_main(args: &ConformanceArgs) -> ExitCode {
    match conformance::run(args.runtime, &args.engine.spec(), &args.config()) {
        Ok(report) => {
            print!("{}", conformance::render(&report, args.runtime));
            ExitCode::SUCCESS
        }
        Err(err) if err.is_usage() => {
            eprintln!("tether conformance: error: {err}");
            ExitCode::from(2)
        }
        Err(err) => {
            println!("conformance: FAILED on {}: {err}", args.runtime);
            ExitCode::FAILURE
        }
    }
}

/// Exit code 2 for bad arguments, 1 for any other failure.
fn usage_or_failure(usage: bool) -> ExitCode {
    if usage {
        ExitCode::from(2)
    } else {
        ExitCode::FAILURE
    }
}
