//! Atomic file replacement: the one way every writer in the workspace puts a file on disk.
//!
//! [`atomic_write`] writes into a fresh temporary file in the destination's directory, flushes and `fsync`s it,
//! then renames it over the destination (an atomic replace on POSIX filesystems) and syncs the directory. A reader
//! therefore sees either the old file or the complete new one, never a torn write; a failure at any step (including
//! an error returned by the caller's closure) removes the temporary file and leaves an existing destination
//! untouched. Temporaries of the same destination left by a killed writer (a process no longer running) are
//! removed first ([`super::stale`]).

use std::fs::{self, File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::error::{IoError, IoResult};

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Removes the temporary file unless the write was committed.
struct TempGuard {
    path: PathBuf,
    committed: bool,
}

impl Drop for TempGuard {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// Writes `path` atomically: `write` fills a buffered temporary file next to `path`, which is then synced and
/// renamed over `path`.
///
/// Use it for every file the workspace writes (checkpoints, adapter configs, bench results) so that a crash or an
/// error mid-write never leaves a truncated file behind.
///
/// # Errors
/// [`IoError::NotFound`] if the parent directory does not exist, [`IoError::Io`] (naming `path`) if creating,
/// writing, syncing or renaming fails or if `write` itself returns an error. In every error case an existing file
/// at `path` is left as it was and the temporary file is removed.
///
/// ```
/// # let dir = std::env::temp_dir().join(format!("peft-atomic-doc-{}", std::process::id()));
/// # std::fs::create_dir_all(&dir).unwrap();
/// use std::io::Write;
/// let path = dir.join("hello.txt");
/// peft_core::io::atomic_write(&path, |w| w.write_all(b"hello"))?;
/// assert_eq!(std::fs::read(&path).unwrap(), b"hello");
/// # std::fs::remove_dir_all(&dir).unwrap();
/// # Ok::<(), peft_core::io::IoError>(())
/// ```
pub fn atomic_write<F>(path: impl AsRef<Path>, write: F) -> IoResult<()>
where
    F: FnOnce(&mut dyn Write) -> std::io::Result<()>,
{
    let path = path.as_ref();
    let err = |e: std::io::Error| IoError::io(path, e);
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let file_name = path
        .file_name()
        .ok_or_else(|| err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "destination has no file name")))?;

    // Temporaries of this destination left by a killed writer (see `super::stale`).
    super::stale::remove_stale_temps(path);
    // A name no other writer (thread or process) uses: pid + process-wide counter, created with `create_new`.
    let (file, guard) = loop {
        let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
        let mut tmp_name = std::ffi::OsString::from(".");
        tmp_name.push(file_name);
        tmp_name.push(format!(".{}.{n}.tmp", std::process::id()));
        let tmp = dir.join(tmp_name);
        match OpenOptions::new().write(true).create_new(true).open(&tmp) {
            Ok(f) => break (f, TempGuard { path: tmp, committed: false }),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(err(e)),
        }
    };
    let mut guard = guard;

    let mut buf = BufWriter::with_capacity(1 << 20, file);
    write(&mut buf).map_err(err)?;
    buf.flush().map_err(err)?;
    let file = buf.into_inner().map_err(|e| err(e.into_error()))?;
    file.sync_all().map_err(err)?;
    drop(file);

    fs::rename(&guard.path, path).map_err(err)?;
    guard.committed = true;
    sync_dir(&dir);
    Ok(())
}

/// Makes the rename durable. Best effort: some filesystems refuse to sync a directory, and the replace itself
/// has already happened atomically.
fn sync_dir(dir: &Path) {
    #[cfg(unix)]
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
    #[cfg(not(unix))]
    let _ = dir;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leftovers(dir: &Path) -> Vec<String> {
        fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".tmp"))
            .collect()
    }

    #[test]
    fn writes_and_replaces_whole_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f.bin");
        atomic_write(&p, |w| w.write_all(b"first version, long")).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"first version, long");
        atomic_write(&p, |w| w.write_all(b"second")).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"second");
        assert!(leftovers(dir.path()).is_empty());
    }

    #[test]
    fn failing_closure_leaves_existing_file_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("keep.bin");
        fs::write(&p, b"precious").unwrap();
        let e = atomic_write(&p, |w| {
            w.write_all(&[0u8; 4096])?;
            Err(std::io::Error::other("disk on fire"))
        })
        .unwrap_err();
        assert!(matches!(e, IoError::Io { ref path, .. } if path == &p), "{e}");
        assert!(e.to_string().contains("disk on fire"));
        assert_eq!(fs::read(&p).unwrap(), b"precious");
        assert!(leftovers(dir.path()).is_empty(), "temp file left behind");
    }

    #[test]
    fn missing_parent_dir_is_not_found() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("no/such/dir/f.bin");
        let e = atomic_write(&p, |w| w.write_all(b"x")).unwrap_err();
        assert!(matches!(e, IoError::NotFound { ref path } if path == &p), "{e}");
    }

    #[test]
    fn rename_onto_directory_fails_cleanly() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sub");
        fs::create_dir(&p).unwrap();
        fs::write(p.join("inner"), b"x").unwrap();
        let e = atomic_write(&p, |w| w.write_all(b"x")).unwrap_err();
        assert!(matches!(e, IoError::Io { .. }), "{e}");
        assert!(p.is_dir());
        assert!(leftovers(dir.path()).is_empty());
    }
}
