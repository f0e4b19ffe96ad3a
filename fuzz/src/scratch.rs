//! A per-process scratch folder for the files a target writes (the readers take paths).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// `$PEFT_FUZZ_SCRATCH` or `/dev/shm` (memory-backed where present) or the temp dir, plus `peft-fuzz-PID`.
fn root() -> &'static Path {
    static ROOT: OnceLock<PathBuf> = OnceLock::new();
    ROOT.get_or_init(|| {
        let base = std::env::var_os("PEFT_FUZZ_SCRATCH").map(PathBuf::from).unwrap_or_else(|| {
            let shm = Path::new("/dev/shm");
            if shm.is_dir() {
                shm.to_path_buf()
            } else {
                std::env::temp_dir()
            }
        });
        let dir = base.join(format!("peft-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
        dir
    })
}

/// An empty folder `name` in the scratch folder (removed and created again: one target iteration at a time per
/// name and thread).
pub fn dir(name: &str) -> PathBuf {
    let d = root().join(format!("{name}-{:?}", std::thread::current().id()).replace(['(', ')'], ""));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap_or_else(|e| panic!("creating {}: {e}", d.display()));
    d
}

/// Writes `data` to `dir/file` and returns the path.
pub fn file(dir: &Path, file: &str, data: &[u8]) -> PathBuf {
    let p = dir.join(file);
    std::fs::write(&p, data).unwrap_or_else(|e| panic!("writing {}: {e}", p.display()));
    p
}
