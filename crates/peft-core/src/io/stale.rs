//! Cleaning up after killed writers: the temporary files and folders a writer leaves when it is killed before it
//! renames them into place.
//!
//! Every writer in the workspace names its temporaries after the destination and its own process id:
//! - [`atomic_write`](super::atomic_write): `.NAME.PID.N.tmp` (a file next to `NAME`);
//! - folder writers (`xtask merge`): `.NAME.tmp-PID` and `.NAME.old-PID` (folders next to `NAME`).
//!
//! [`remove_stale_temps`] removes exactly those entries for one destination whose process is no longer running,
//! and nothing else: another name, another pattern, a live process or a platform where liveness cannot be told
//! (anything but Linux) leaves the entry alone.

use std::path::{Path, PathBuf};

/// The process id encoded in `entry` when it is one of our temporaries for destination file name `name`.
pub fn temp_owner(entry: &str, name: &str) -> Option<u32> {
    let rest = entry.strip_prefix('.')?.strip_prefix(name)?;
    // `.NAME.tmp-PID` / `.NAME.old-PID`
    if let Some(pid) = rest.strip_prefix(".tmp-").or_else(|| rest.strip_prefix(".old-")) {
        return digits(pid);
    }
    // `.NAME.PID.N.tmp`
    let (pid, n) = rest.strip_prefix('.')?.strip_suffix(".tmp")?.split_once('.')?;
    digits(n)?;
    digits(pid)
}

fn digits(s: &str) -> Option<u32> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// Whether process `pid` is running (Linux: `/proc/PID` exists; elsewhere assumed running, so nothing is
/// removed).
pub fn pid_alive(pid: u32) -> bool {
    if cfg!(target_os = "linux") {
        Path::new("/proc").join(pid.to_string()).exists()
    } else {
        true
    }
}

/// Removes the temporaries of destination `dest` (see the module docs) left by processes that are no longer
/// running; returns what was removed. Errors while listing or removing are ignored (best effort: a later run
/// tries again).
pub fn remove_stale_temps(dest: &Path) -> Vec<PathBuf> {
    let Some(name) = dest.file_name().and_then(|n| n.to_str()) else { return Vec::new() };
    let dir = match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let me = std::process::id();
    let mut removed = Vec::new();
    for e in entries.flatten() {
        let file_name = e.file_name();
        let Some(entry) = file_name.to_str() else { continue };
        let Some(pid) = temp_owner(entry, name) else { continue };
        if pid == me || pid_alive(pid) {
            continue;
        }
        let Ok(ft) = e.file_type() else { continue };
        let path = e.path();
        let ok = if ft.is_dir() { std::fs::remove_dir_all(&path) } else { std::fs::remove_file(&path) };
        if ok.is_ok() {
            removed.push(path);
        }
    }
    removed.sort();
    removed
}

/// Undoes a folder replacement that was killed half-way: when `dest` does not exist but a `.NAME.old-PID` of a
/// process no longer running does (the writer moved the old `dest` aside and was killed before it renamed the
/// new one into place), that folder is renamed back to `dest` and its path returned. Anything else (a `dest`
/// that exists, a live writer, no such folder) changes nothing. With several candidates the newest (by
/// modification time) is restored; the others are left for [`remove_stale_temps`].
///
/// Run it before deciding whether `dest` exists, then [`remove_stale_temps`].
pub fn restore_moved_aside(dest: &Path) -> Option<PathBuf> {
    if dest.symlink_metadata().is_ok() {
        return None;
    }
    let name = dest.file_name()?.to_str()?;
    let dir = match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let me = std::process::id();
    let mut best: Option<(std::time::SystemTime, PathBuf)> = None;
    for e in std::fs::read_dir(dir).ok()?.flatten() {
        let file_name = e.file_name();
        let Some(entry) = file_name.to_str() else { continue };
        let Some(pid) =
            entry.strip_prefix('.').and_then(|r| r.strip_prefix(name)).and_then(|r| r.strip_prefix(".old-"))
        else {
            continue;
        };
        let Some(pid) = digits(pid) else { continue };
        if pid == me || pid_alive(pid) || !e.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let t = e.metadata().and_then(|m| m.modified()).unwrap_or(std::time::UNIX_EPOCH);
        if best.as_ref().is_none_or(|(b, _)| t > *b) {
            best = Some((t, e.path()));
        }
    }
    let (_, from) = best?;
    std::fs::rename(&from, dest).ok()?;
    Some(from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_our_patterns_for_this_name_are_recognised() {
        assert_eq!(temp_owner(".out.tmp-123", "out"), Some(123));
        assert_eq!(temp_owner(".out.old-7", "out"), Some(7));
        assert_eq!(temp_owner(".f.safetensors.99.3.tmp", "f.safetensors"), Some(99));
        for other in
            [".out.tmp-", ".out.tmp-12x", "out.tmp-1", ".outer.tmp-1", ".out.1.tmp", ".out.tmp-1/x", ".o.tmp-1"]
        {
            assert_eq!(temp_owner(other, "out"), None, "{other}");
        }
    }

    /// Issue 14 item 8: temporaries of a killed run are removed by the next one; live or foreign entries stay.
    #[cfg(target_os = "linux")]
    #[test]
    fn dead_owners_are_cleaned_live_and_foreign_entries_kept() {
        let d = tempfile::tempdir().unwrap();
        let dead = u32::MAX - 1; // above Linux's pid_max, so never a running process
        let me = std::process::id();
        for dir in
            [format!(".out.tmp-{dead}"), format!(".out.old-{dead}"), format!(".out.tmp-{me}"), ".out.tmp-x".into()]
        {
            std::fs::create_dir_all(d.path().join(&dir).join("sub")).unwrap();
        }
        std::fs::write(d.path().join(format!(".m.st.{dead}.0.tmp")), b"x").unwrap();
        std::fs::write(d.path().join(format!(".other.tmp-{dead}")), b"x").unwrap();
        let removed = remove_stale_temps(&d.path().join("out"));
        assert_eq!(removed.len(), 2, "{removed:?}");
        assert_eq!(remove_stale_temps(&d.path().join("m.st")).len(), 1);
        let mut left: Vec<String> =
            std::fs::read_dir(d.path()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        left.sort();
        assert_eq!(left, [".other.tmp-4294967294".to_string(), format!(".out.tmp-{me}"), ".out.tmp-x".into()]);
    }

    /// A replacement killed between moving the old folder aside and renaming the new one in: the old folder is
    /// put back (and only then: an existing destination, a live owner or a file are left alone).
    #[cfg(target_os = "linux")]
    #[test]
    fn a_folder_moved_aside_by_a_killed_writer_is_restored() {
        let d = tempfile::tempdir().unwrap();
        let dest = d.path().join("out");
        let dead = u32::MAX - 1;
        let aside = d.path().join(format!(".out.old-{dead}"));
        std::fs::create_dir_all(&aside).unwrap();
        std::fs::write(aside.join("model.safetensors"), b"old").unwrap();
        std::fs::create_dir_all(d.path().join(format!(".out.tmp-{dead}"))).unwrap();
        assert_eq!(restore_moved_aside(&dest), Some(aside.clone()));
        assert_eq!(std::fs::read(dest.join("model.safetensors")).unwrap(), b"old");
        assert!(!aside.exists());
        // dest exists now: nothing more to do; the new folder's temporary is stale and goes
        assert_eq!(restore_moved_aside(&dest), None);
        assert_eq!(remove_stale_temps(&dest).len(), 1);
        // a live owner's folder (ours) or a file is not taken
        let other = d.path().join("o2");
        std::fs::create_dir_all(d.path().join(format!(".o2.old-{}", std::process::id()))).unwrap();
        std::fs::write(d.path().join(format!(".o2.old-{dead}")), b"file").unwrap();
        assert_eq!(restore_moved_aside(&other), None);
        assert!(!other.exists());
    }
}
