//! The few filesystem steps crash safety rests on: fsync of files and directories, atomic file replacement and an
//! atomic directory swap.

use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};

/// Flush a file's data to disk (the handle's mode does not matter to fsync on Unix).
pub fn sync_file(path: &Path) -> Result<()> {
    std::fs::File::open(path).and_then(|f| f.sync_all()).with_context(|| format!("cannot fsync {}", path.display()))
}

/// Make a directory's entries (creations, renames) durable.
pub fn sync_dir(path: &Path) -> Result<()> {
    std::fs::File::open(path)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("cannot fsync directory {}", path.display()))
}

/// Create `path` with `bytes` and fsync it.
pub fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    f.write_all(bytes).and_then(|_| f.sync_all()).with_context(|| format!("cannot write {}", path.display()))
}

/// Replace `path` by writing `tmp`, fsyncing it, renaming over `path`, and fsyncing the directory: readers see the
/// old content or the new, never a torn file.
pub fn write_atomic(path: &Path, bytes: &[u8], tmp: &Path) -> Result<()> {
    write_synced(tmp, bytes)?;
    std::fs::rename(tmp, path).with_context(|| format!("cannot rename {} to {}", tmp.display(), path.display()))?;
    sync_dir(path.parent().unwrap_or(Path::new(".")))
}

/// Move the finished directory `src` to `dest`. An existing `dest` is swapped out atomically (Linux
/// `renameat2(RENAME_EXCHANGE)`) and then deleted; where no swap exists it is first moved aside to `aside`, leaving a
/// moment in which `dest` is absent (discovery then falls back to the next newest checkpoint).
pub fn replace_dir(src: &Path, dest: &Path, aside: &Path) -> Result<()> {
    if !dest.exists() {
        return Ok(std::fs::rename(src, dest)?);
    }
    if exchange(src, dest)? {
        // `src` now holds the old checkpoint.
        sync_dir(dest.parent().unwrap_or(Path::new(".")))?;
        return Ok(std::fs::remove_dir_all(src)?);
    }
    std::fs::rename(dest, aside)?;
    std::fs::rename(src, dest)?;
    sync_dir(dest.parent().unwrap_or(Path::new(".")))?;
    Ok(std::fs::remove_dir_all(aside)?)
}

/// Atomically swap two paths; `Ok(false)` when the OS or filesystem cannot.
#[cfg(target_os = "linux")]
fn exchange(a: &Path, b: &Path) -> Result<bool> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let ca = CString::new(a.as_os_str().as_bytes())?;
    let cb = CString::new(b.as_os_str().as_bytes())?;
    // SAFETY: both arguments are valid NUL-terminated paths that outlive the call.
    let rc =
        unsafe { libc::renameat2(libc::AT_FDCWD, ca.as_ptr(), libc::AT_FDCWD, cb.as_ptr(), libc::RENAME_EXCHANGE) };
    if rc == 0 {
        return Ok(true);
    }
    let err = std::io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EINVAL) | Some(libc::ENOSYS) | Some(libc::ENOTSUP) => Ok(false),
        _ => Err(err).with_context(|| format!("cannot swap {} and {}", a.display(), b.display())),
    }
}

#[cfg(not(target_os = "linux"))]
fn exchange(_a: &Path, _b: &Path) -> Result<bool> {
    Ok(false)
}
