//! `cargo xtask`: the peft-rs benchmark driver (`bench`), asset check (`assets`) and model tools (`embed`, `merge`,
//! `quantize`, `dequantize`).

mod assets;
mod baseline;
mod bench;
mod cli;
mod embed;
mod glue;
mod merge;
mod model;
mod plot;
mod quantize;
mod report;
mod train;

use std::process::ExitCode;

use clap::Parser;

use crate::cli::{Cli, Cmd, Suite};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let res = match cli.cmd {
        Cmd::Bench(args) => bench::run(&args),
        Cmd::Assets { suite } => assets_cmd(suite),
        Cmd::Embed(args) => embed::run(&args),
        Cmd::Merge(args) => merge::run(&args),
        Cmd::Quantize(args) => quantize::run_quantize(&args),
        Cmd::Dequantize(args) => quantize::run_dequantize(&args),
    };
    match res {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn assets_cmd(suite: Suite) -> anyhow::Result<ExitCode> {
    if suite != Suite::Glue {
        anyhow::bail!("suite {suite:?} is not built yet, so it has no asset list; only `--suite glue` exists");
    }
    let tasks: Vec<_> = glue::tasks::Task::ALL.to_vec();
    match assets::check(&assets::glue_needs(&tasks)) {
        Ok(dir) => {
            println!("all GLUE-suite assets present in {}", dir.display());
            Ok(ExitCode::SUCCESS)
        }
        Err(msg) => {
            eprintln!("{msg}");
            Ok(ExitCode::from(2))
        }
    }
}
