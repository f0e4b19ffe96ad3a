//! Command line of `cargo xtask`.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// peft-rs developer tasks.
#[derive(Parser, Debug)]
#[command(name = "cargo xtask", bin_name = "cargo xtask")]
pub struct Cli {
    /// The task to run.
    #[command(subcommand)]
    pub cmd: Cmd,
}

/// Subcommands.
#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// Fine-tune and evaluate methods on a benchmark suite; writes results.json, report.md and plots.
    Bench(BenchArgs),
    /// Check that every asset the suites need is present, and say how to get what is missing; with `--fetch`,
    /// download what the default bench suite needs (MiniLM-L6, GLUE SST-2 and MRPC) and verify its checksums.
    Assets(AssetsArgs),
    /// Run a backbone over a list of inputs; write hidden states, pooled embeddings (and LLaMA logits).
    Embed(crate::embed::EmbedArgs),
    /// Merge a PEFT LoRA adapter into a Hugging Face model folder and write the merged folder.
    Merge(crate::merge::MergeArgs),
    /// Score a GLUE task's sparse adapter alone and with other sparse deltas added to the base (LT-SFT
    /// composition).
    Compose(crate::compose::ComposeArgs),
    /// LT-SFT's recipe with a language (here: domain) SFT trained by masked language modelling on a GLUE task's
    /// unlabelled split: task deltas trained with and without it, scored alone and composed.
    LanguageSft(crate::language_sft::LanguageSftArgs),
    /// Quantize the 2-D weights of a safetensors file to bitsandbytes' NF4/FP4/int8 layout.
    Quantize(crate::quantize::QuantizeArgs),
    /// Dequantize a bitsandbytes-layout safetensors file back to F32 weights.
    Dequantize(crate::quantize::DequantizeArgs),
}

/// `cargo xtask assets` options.
#[derive(Args, Debug, Clone)]
pub struct AssetsArgs {
    /// Suite whose assets to check.
    #[arg(long, value_enum, default_value_t = Suite::Glue)]
    pub suite: Suite,
    /// Download the default bench suite's files (Hugging Face Hub at a pinned revision, honouring
    /// `HF_ENDPOINT`; GitHub raw files at pinned commits, honouring `PEFT_GITHUB_RAW_ENDPOINT`), verify their
    /// SHA-256 and write them in the asset pack's layout. Then run the bench with `PEFT_ASSETS=<dest>`.
    #[arg(long)]
    pub fetch: bool,
    /// Where `--fetch` writes (default: `PEFT_ASSETS`, else the asset directory found, else
    /// `<workspace>/target/peft-assets`).
    #[arg(long, requires = "fetch")]
    pub dest: Option<PathBuf>,
    /// JSON file replacing pinned checksums, `{"<asset path>": {"sha256": "..", "source_sha256": ".."}}`: for a
    /// mirror serving other bytes, and for tests serving fake files. Without it the pinned checksums are used.
    #[arg(long, requires = "fetch", hide = true)]
    pub checksums: Option<PathBuf>,
}

/// Benchmark suites.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Suite {
    /// GLUE text classification with MiniLM (built).
    Glue,
    /// VTAB-1k image classification with DINOv2.
    Vtab,
    /// COCO image-text retrieval on frozen DINOv2 + MiniLM features (captioning not built yet).
    Coco,
    /// Spoken-digit audio classification (FSDD) with the Whisper tiny.en encoder, PETL-AST methods (built).
    Audio,
    /// LLM-Adapters (series, parallel, LoRA) on SmolLM2-135M, generated arithmetic word problems, exact match.
    LlmAdapters,
    /// Every suite in turn (glue, vtab, audio, coco, llm-adapters).
    All,
}

/// External baselines.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Baseline {
    /// transformers + peft on PyTorch (CPU), same recipe and thread count.
    Pytorch,
}

/// `cargo xtask bench` options.
#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    /// Suite to run.
    #[arg(long, value_enum, default_value_t = Suite::Glue)]
    pub suite: Suite,
    /// Comma-separated method names from the registries (default: head,bitfit,lora,full where available).
    #[arg(long, value_delimiter = ',')]
    pub methods: Option<Vec<String>>,
    /// Comma-separated GLUE tasks (sst2, mrpc, cola, stsb, rte, wnli).
    #[arg(long, value_delimiter = ',')]
    pub tasks: Option<Vec<String>>,
    /// Smoke-test profile: SST-2 only, 256 training examples (16 steps).
    #[arg(long, conflicts_with = "full")]
    pub quick: bool,
    /// Full profile: full training sets, every task with a training split, 3 epochs.
    #[arg(long)]
    pub full: bool,
    /// Override the profile's number of training examples per task (a fixed random subset; results go to a
    /// run folder named after the override, e.g. `default-n8000`).
    #[arg(long, value_parser = positive_usize)]
    pub train_examples: Option<usize>,
    /// Override the profile's number of epochs (run folder gets an `-e<N>` suffix).
    #[arg(long, value_parser = positive_usize)]
    pub epochs: Option<usize>,
    /// Override every selected method's learning rate (run folder gets an `-lr<X>` suffix); for sweeps.
    #[arg(long, value_parser = positive_finite, allow_hyphen_values = true)]
    pub lr: Option<f64>,
    /// Seed of the first run.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Number of seeds (seed, seed+1, ...).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    pub seeds: u64,
    /// Worker threads (default: all cores).
    #[arg(long, value_parser = positive_usize)]
    pub threads: Option<usize>,
    /// Output root (default: <workspace>/target/bench).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Re-run runs already recorded in results.json.
    #[arg(long)]
    pub force: bool,
    /// VTAB: input resolution in pixels (the profile's otherwise; run folder gets an `-r<N>` suffix).
    #[arg(long, value_parser = positive_usize)]
    pub resolution: Option<usize>,
    /// VTAB: a folder of VTAB-1k task folders (NOAH's `vtab-1k/` with the file lists, or folders in this
    /// project's `index.csv` layout); `--tasks` picks among them. Default: the shipped tasks.
    #[arg(long)]
    pub data_root: Option<PathBuf>,
    /// VTAB: score on a fixed random subset of N test images per task; llm-adapters: N test problems (run folder
    /// gets a `-t<N>` suffix).
    #[arg(long, value_parser = positive_usize)]
    pub test_examples: Option<usize>,
    /// VTAB: also run the few-shot table (1/2/4/8/16 shots; GDA, Tip-Adapter, Tip-Adapter-F, TIP-X and a linear
    /// probe on frozen features).
    #[arg(long)]
    pub fewshot: bool,
    /// GLUE composition methods (fusion, scalearn*, average): the tasks whose SeqBn adapters are the sources
    /// (trained first by the bench when missing; default sst2,cola,stsb,mrpc,rte, the target's own included; run
    /// folder gets a `-from-<tasks>` suffix when given).
    #[arg(long, value_delimiter = ',')]
    pub compose_from: Option<Vec<String>>,
    /// GLUE: MFTCoder-style multi-task run instead (one shared adapter per `--methods` entry, default `lora`, one
    /// head per task; loss modes case1 / case3 / CoBa; `--tasks` default sst2,cola,mrpc with `--train-examples`
    /// halving from task to task).
    #[arg(long)]
    pub multitask: bool,
    /// Also run an external baseline on the same recipe.
    #[arg(long, value_enum)]
    pub baseline: Option<Baseline>,
}

/// Parses a whole number >= 1 (counts such as `--train-examples`, `--threads`).
pub(crate) fn positive_usize(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(0) => Err("must be at least 1 (0 would run nothing)".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(format!("`{s}` is not a whole number: {e}")),
    }
}

/// Parses a finite number > 0 (`--lr`).
pub(crate) fn positive_finite(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 => Ok(v),
        Ok(v) => Err(format!("must be a finite number > 0, got {v}")),
        Err(e) => Err(format!("`{s}` is not a number: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_bench_flags() {
        let c = Cli::try_parse_from([
            "xtask",
            "bench",
            "--methods",
            "head,lora",
            "--tasks",
            "sst2,mrpc",
            "--seeds",
            "3",
            "--threads",
            "2",
            "--force",
            "--baseline",
            "pytorch",
            "--full",
        ])
        .unwrap();
        let Cmd::Bench(b) = c.cmd else { panic!("not bench") };
        assert_eq!(b.methods.unwrap(), vec!["head", "lora"]);
        assert_eq!(b.tasks.unwrap(), vec!["sst2", "mrpc"]);
        assert_eq!((b.seeds, b.threads, b.force, b.full, b.quick), (3, Some(2), true, true, false));
        assert_eq!(b.baseline, Some(Baseline::Pytorch));
        assert_eq!(b.suite, Suite::Glue);
    }

    /// Issue 14 item 9: counts of 0 and non-positive or non-finite learning rates are refused with a message
    /// naming the flag (they used to record 0-step results or run nothing with exit 0).
    #[test]
    fn bench_refuses_zero_counts_and_bad_learning_rates() {
        for (flag, value, says) in [
            ("--train-examples", "0", "at least 1"),
            ("--epochs", "0", "at least 1"),
            ("--seeds", "0", "0"),
            ("--threads", "0", "at least 1"),
            ("--lr", "NaN", "finite number > 0"),
            ("--lr", "inf", "finite number > 0"),
            ("--lr", "0", "finite number > 0"),
            ("--lr", "-1e-3", "finite number > 0"),
            ("--threads", "two", "not a whole number"),
        ] {
            let e = Cli::try_parse_from(["xtask", "bench", flag, value]).unwrap_err().to_string();
            assert!(e.contains(flag) && e.contains(says), "{flag} {value}: {e}");
        }
        let ok = ["xtask", "bench", "--train-examples", "1", "--seeds", "1", "--threads", "1", "--lr", "1e-4"];
        assert!(Cli::try_parse_from(ok).is_ok());
    }

    #[test]
    fn quick_and_full_conflict() {
        assert!(Cli::try_parse_from(["xtask", "bench", "--quick", "--full"]).is_err());
        assert!(Cli::try_parse_from(["xtask", "bench", "--suite", "vtab"]).is_ok());
        assert!(Cli::try_parse_from(["xtask", "assets"]).is_ok());
    }
}
