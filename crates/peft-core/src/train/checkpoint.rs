//! Checkpoint and resume of a [`Trainer`].
//!
//! Layout under the checkpoint folder: `step-<N>/` holds `params.safetensors` (the trained parameters by name),
//! `optimizer.safetensors` (AdamW's moments as `<param>::<buffer>`) and `state.json` (counters and per-parameter
//! step counts); the file `latest` names the newest complete `step-<N>`. A checkpoint is written into a
//! temporary folder that is renamed into place before `latest` is (atomically) updated, so a crash at any point
//! leaves either the previous checkpoint or the new one; older step folders and stale temporaries are removed
//! afterwards. Saving a step that already has a folder moves the old folder aside (`.step-<N>.old-PID`) until the
//! new one is in place; if the writer is killed in between, the next [`Trainer::latest_checkpoint`] puts it back.
//! Tested by killing a saving process at random points (`tests/kill9_checkpoint.rs`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ndarray::ArrayD;
use serde::{Deserialize, Serialize};

use crate::io::safetensors::{write_safetensors, SafeTensorsFile};
use crate::io::IoError;
use crate::optim::{Optimizer, ParamState, StateDict};
use crate::train::{TrainError, Trainer};

#[derive(Serialize, Deserialize)]
struct State {
    step: usize,
    micro: usize,
    skipped: usize,
    in_a_row: usize,
    kind: String,
    optimizer_steps: u64,
    param_steps: BTreeMap<String, u64>,
}

fn bad(path: &Path, reason: impl Into<String>) -> TrainError {
    TrainError::Checkpoint { path: path.to_path_buf(), reason: reason.into() }
}

impl Trainer<'_> {
    /// Writes a checkpoint of the trained parameters, the optimizer and the counters into `dir` (see the module
    /// docs for the layout and the crash guarantee).
    ///
    /// # Errors
    /// IO errors.
    pub fn save_checkpoint(&self, dir: &Path) -> Result<(), TrainError> {
        std::fs::create_dir_all(dir).map_err(|e| IoError::io(dir, e))?;
        let name = format!("step-{:08}", self.step);
        let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(|e| IoError::io(&tmp, e))?;
        }
        std::fs::create_dir_all(&tmp).map_err(|e| IoError::io(&tmp, e))?;
        let params: Vec<(String, ArrayD<f32>)> =
            self.params.iter().map(|p| (p.name().to_string(), p.value().to_owned())).collect();
        write_safetensors(tmp.join("params.safetensors"), params.iter().map(|(k, v)| (k, v)), None)?;
        let sd = self.opt.state_dict();
        let mut bufs = Vec::new();
        let mut param_steps = BTreeMap::new();
        for (pname, st) in &sd.params {
            param_steps.insert(pname.clone(), st.step);
            for (b, v) in &st.buffers {
                bufs.push((format!("{pname}::{b}"), v.clone()));
            }
        }
        write_safetensors(tmp.join("optimizer.safetensors"), bufs.iter().map(|(k, v)| (k, v)), None)?;
        let state = State {
            step: self.step,
            micro: self.micro,
            skipped: self.skipped,
            in_a_row: self.in_a_row,
            kind: sd.kind.clone(),
            optimizer_steps: sd.steps,
            param_steps,
        };
        let text = serde_json::to_string_pretty(&state).map_err(|e| bad(dir, e.to_string()))?;
        crate::io::atomic_write(tmp.join("state.json"), |w| w.write_all(text.as_bytes()))?;
        let fin = dir.join(&name);
        // Saving a step that is already saved (after a resume): the old folder is moved aside, not deleted, until
        // the new one is in place; a kill between the two renames is undone by `latest_checkpoint`.
        let old = dir.join(format!(".{name}.old-{}", std::process::id()));
        let replacing = fin.exists();
        if replacing {
            std::fs::rename(&fin, &old).map_err(|e| IoError::io(&fin, e))?;
        }
        std::fs::rename(&tmp, &fin).map_err(|e| IoError::io(&fin, e))?;
        if replacing {
            let _ = std::fs::remove_dir_all(&old);
        }
        crate::io::atomic_write(dir.join("latest"), |w| w.write_all(name.as_bytes()))?;
        // Older checkpoints and temporaries left by killed writers go.
        if let Ok(rd) = std::fs::read_dir(dir) {
            for e in rd.flatten() {
                let n = e.file_name().to_string_lossy().to_string();
                let old_step = n.starts_with("step-") && n != name;
                let stale_tmp = n.starts_with(".step-") && (n.contains(".tmp-") || n.contains(".old-"));
                if old_step || stale_tmp {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        Ok(())
    }

    /// The newest complete checkpoint folder under `dir`, if any. When a save of the same step was killed
    /// after moving that step's folder aside, the folder is restored first ([`crate::io::restore_moved_aside`]).
    pub fn latest_checkpoint(dir: &Path) -> Option<PathBuf> {
        let name = std::fs::read_to_string(dir.join("latest")).ok()?;
        let p = dir.join(name.trim());
        crate::io::restore_moved_aside(&p);
        p.join("state.json").is_file().then_some(p)
    }

    /// Restores the newest checkpoint under `dir` into this trainer (same parameters by name and shape).
    /// Returns false when there is none.
    ///
    /// # Errors
    /// [`TrainError::Checkpoint`] for a checkpoint of other parameters or a corrupt state; IO errors.
    pub fn load_checkpoint(&mut self, dir: &Path) -> Result<bool, TrainError> {
        let Some(ck) = Self::latest_checkpoint(dir) else { return Ok(false) };
        let spath = ck.join("state.json");
        let text = std::fs::read_to_string(&spath).map_err(|e| IoError::io(&spath, e))?;
        let state: State = serde_json::from_str(&text).map_err(|e| bad(&spath, e.to_string()))?;
        let pf = SafeTensorsFile::open(ck.join("params.safetensors"))?;
        let mut values = Vec::new();
        for p in &self.params {
            if !pf.contains(p.name()) {
                return Err(bad(&ck, format!("parameter `{}` is not in the checkpoint", p.name())));
            }
            values.push(pf.get_checked(p.name(), &p.shape())?);
        }
        if pf.len() != self.params.len() {
            return Err(bad(&ck, format!("{} parameters saved, {} trained now", pf.len(), self.params.len())));
        }
        let of = SafeTensorsFile::open(ck.join("optimizer.safetensors"))?;
        let mut params = BTreeMap::new();
        for (pname, step) in &state.param_steps {
            let mut buffers = BTreeMap::new();
            for key in of.names().filter(|k| k.starts_with(&format!("{pname}::"))) {
                let b = key[pname.len() + 2..].to_string();
                buffers.insert(b, of.get(key)?);
            }
            params.insert(pname.clone(), ParamState { step: *step, buffers });
        }
        let sd = StateDict { kind: state.kind.clone(), steps: state.optimizer_steps, params };
        self.opt.load_state_dict(&sd)?;
        for (p, v) in self.params.iter().zip(values) {
            p.set(v)?;
        }
        self.step = state.step;
        self.micro = state.micro;
        self.skipped = state.skipped;
        self.in_a_row = state.in_a_row;
        Ok(true)
    }
}
