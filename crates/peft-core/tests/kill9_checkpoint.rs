//! Issue 14 (Build, crash safety): `kill -9` of a process saving trainer checkpoints, at random points, leaves the
//! previous complete checkpoint or the new one, never a torn or missing one; the next save removes what the
//! killed one left.
//!
//! The test runs this test binary again as the writer (the ignored test `writer_child`, selected by the
//! environment variable `PEFT_KILL9_CKPT_DIR`): it trains a 1024 x 1024 linear layer (12 MB per checkpoint with
//! the AdamW moments) and saves a checkpoint after every step. The parent SIGKILLs it after a delay drawn
//! uniformly over the writer's uninterrupted run time (seeded; the seed is printed, `PEFT_KILL9_SEED` replays it),
//! then loads the latest checkpoint into a fresh trainer and compares its parameters with an in-process run of
//! the same number of steps (training is deterministic), bit for bit.

#![cfg(unix)]

use std::hash::{Hash, Hasher};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use peft_core::nn::{Linear, RandomInit, WeightSource};
use peft_core::train::{Loss, NoHooks, Trainer, TrainerConfig};
use peft_core::Tensor;
use rand::{Rng, SeedableRng};

const STEPS: usize = 12;
const KILLS: usize = 5;
const DIM: usize = 1024;
const ENV: &str = "PEFT_KILL9_CKPT_DIR";

fn model() -> Linear {
    let l = Linear::load("lin", DIM, DIM, true, &RandomInit::new(7, 0.02)).unwrap();
    for p in l.base().params() {
        p.set_trainable(true);
    }
    l
}

fn trainer(l: &Linear) -> Trainer<'static> {
    let cfg = TrainerConfig { lr: 1e-3, total_steps: STEPS, warmup_steps: 2, ..TrainerConfig::default() };
    Trainer::new(l.base().params(), &NoHooks, cfg).unwrap()
}

fn step(t: &mut Trainer<'_>, l: &Linear, x: &Tensor, y: &Tensor) {
    t.step(|ctx| Ok(Loss::Single(l.forward(x, ctx)?.sub(y)?.square().mean_all()))).unwrap();
}

fn data() -> (Tensor, Tensor) {
    let x = RandomInit::new(1, 1.0).get("x", &[4, DIM]).unwrap();
    let y = RandomInit::new(2, 1.0).get("y", &[4, DIM]).unwrap();
    (Tensor::new(x), Tensor::new(y))
}

/// A hash of the parameters' bits.
fn fingerprint(l: &Linear) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for p in l.base().params() {
        for v in p.value().iter() {
            v.to_bits().hash(&mut h);
        }
    }
    h.finish()
}

/// The writer: trains and saves a checkpoint after every step (run by the parent test, not on its own).
#[test]
#[ignore = "child process of the kill -9 tests; runs only when they spawn it"]
fn writer_child() {
    let Some(dir) = std::env::var_os(ENV) else { return };
    let l = model();
    let (x, y) = data();
    let mut t = trainer(&l);
    for _ in 0..STEPS {
        step(&mut t, &l, &x, &y);
        t.save_checkpoint(Path::new(&dir)).unwrap();
    }
}

fn spawn_writer(dir: &Path) -> std::process::Child {
    Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "writer_child", "--ignored", "--test-threads", "1"])
        .env(ENV, dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = match std::fs::read_dir(dir) {
        Ok(rd) => rd.map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect(),
        Err(_) => Vec::new(),
    };
    v.sort();
    v
}

#[test]
fn checkpoint_save_killed_at_random_points_leaves_a_complete_checkpoint() {
    // Reference fingerprints after each step, and the writer's uninterrupted run time.
    let l = model();
    let (x, y) = data();
    let mut t = trainer(&l);
    let mut want = vec![fingerprint(&l)];
    for _ in 0..STEPS {
        step(&mut t, &l, &x, &y);
        want.push(fingerprint(&l));
    }
    let root = tempfile::tempdir().unwrap();
    let start = Instant::now();
    let status = spawn_writer(&root.path().join("full")).wait().unwrap();
    assert!(status.success());
    let full = start.elapsed();
    let seed = std::env::var("PEFT_KILL9_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
    });
    eprintln!("writer: uninterrupted run {full:?} ({STEPS} saves); kill seed {seed} (PEFT_KILL9_SEED)");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut mid_write = 0;
    for i in 0..KILLS {
        let dir = root.path().join(format!("k{i}"));
        let delay = full.mul_f64(rng.gen_range(0.0..1.0));
        let mut child = spawn_writer(&dir);
        let end = Instant::now() + delay;
        while Instant::now() < end && child.try_wait().unwrap().is_none() {
            std::thread::sleep(Duration::from_millis(2));
        }
        child.kill().unwrap(); // SIGKILL (an error only if it already exited, which kill() tolerates)
        child.wait().unwrap();
        let left = entries(&dir);
        let torn = left.iter().filter(|n| n.starts_with('.')).count();
        mid_write += usize::from(torn > 0);
        // The latest checkpoint, if any was completed, loads and equals the in-process run at its step.
        let l2 = model();
        let mut t2 = trainer(&l2);
        let loaded = t2.load_checkpoint(&dir).unwrap_or_else(|e| panic!("kill {i} after {delay:?}: {e} ({left:?})"));
        let at = if loaded { t2.steps_done() } else { 0 };
        if loaded {
            assert!((1..=STEPS).contains(&at));
            assert_eq!(fingerprint(&l2), want[at], "kill {i} after {delay:?}: checkpoint of step {at} differs");
        }
        eprintln!("kill {i} after {delay:?}: latest checkpoint step {at}, entries {left:?}");
        // The next save (resumed) leaves exactly `latest` and one step folder.
        if at < STEPS {
            step(&mut t2, &l2, &x, &y);
            assert_eq!(fingerprint(&l2), want[at + 1], "resumed training continues exactly");
        }
        t2.save_checkpoint(&dir).unwrap();
        let after = entries(&dir);
        assert_eq!(after, ["latest".to_string(), format!("step-{:08}", (at + 1).min(STEPS))], "kill {i}");
    }
    eprintln!("{mid_write} of {KILLS} kills left temporaries (landed mid-save)");
}

/// A save of an already saved step killed between moving the old folder aside and renaming the new one in: the
/// next `latest_checkpoint` restores the old folder.
#[test]
fn resaving_a_step_killed_between_renames_restores_the_old_folder() {
    let dir = tempfile::tempdir().unwrap();
    let l = Linear::load("lin", 3, 2, true, &RandomInit::new(0, 0.5)).unwrap();
    for p in l.base().params() {
        p.set_trainable(true);
    }
    let cfg = TrainerConfig { lr: 0.05, total_steps: 4, ..TrainerConfig::default() };
    let mut t = Trainer::new(l.base().params(), &NoHooks, cfg.clone()).unwrap();
    let (x, y) = (
        Tensor::new(RandomInit::new(1, 1.0).get("x", &[4, 3]).unwrap()),
        Tensor::new(RandomInit::new(2, 1.0).get("y", &[4, 2]).unwrap()),
    );
    step(&mut t, &l, &x, &y);
    t.save_checkpoint(dir.path()).unwrap();
    let saved = fingerprint(&l);
    // The killed writer (a pid that is never running) had moved step-00000001 aside.
    let dead = u32::MAX - 1;
    std::fs::rename(dir.path().join("step-00000001"), dir.path().join(format!(".step-00000001.old-{dead}"))).unwrap();
    let l2 = Linear::load("lin", 3, 2, true, &RandomInit::new(9, 0.5)).unwrap();
    let mut t2 = Trainer::new(l2.base().params(), &NoHooks, cfg).unwrap();
    assert!(t2.load_checkpoint(dir.path()).unwrap(), "the old checkpoint is found again");
    assert_eq!(t2.steps_done(), 1);
    assert_eq!(fingerprint(&l2), saved);
    assert_eq!(entries(dir.path()), ["latest", "step-00000001"]);
}
