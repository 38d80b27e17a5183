//! `--output FILE` of `safe generate` and `safe logprobs`: created before the work (a path that cannot be written is
//! bad input, found first), written to a temporary file beside it, and renamed over it only when complete. A run
//! that fails, or an `--output` that is also the `--input`, never truncates or half-writes an existing file.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// The temporary file of an `--output`, renamed into place by [`OutputFile::commit`]; removed if dropped before.
pub struct OutputFile {
    dest: PathBuf,
    tmp: PathBuf,
    file: Option<BufWriter<File>>,
}

impl OutputFile {
    pub fn create(dest: &Path) -> Result<Self> {
        let name = dest.file_name().with_context(|| format!("--output: {} is not a file name", dest.display()))?;
        let tmp = dest.with_file_name(format!(".{}.tmp-{}", name.to_string_lossy(), std::process::id()));
        let file = File::create(&tmp).with_context(|| format!("--output: cannot create {}", dest.display()))?;
        Ok(Self { dest: dest.to_path_buf(), tmp, file: Some(BufWriter::new(file)) })
    }

    /// Flush and rename over the destination.
    pub fn commit(mut self) -> Result<()> {
        let file = self.file.take().expect("committed once");
        file.into_inner()
            .map_err(|e| e.into_error())
            .and_then(|f| f.sync_all())
            .with_context(|| format!("cannot write {}", self.tmp.display()))?;
        std::fs::rename(&self.tmp, &self.dest)
            .with_context(|| format!("cannot move the output to {}", self.dest.display()))
    }
}

impl Drop for OutputFile {
    fn drop(&mut self) {
        if self.file.take().is_some() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// Where results go: an `--output` file or stdout.
pub enum Sink {
    Stdout(std::io::StdoutLock<'static>),
    File(OutputFile),
}

impl Sink {
    pub fn new(output: Option<OutputFile>) -> Self {
        match output {
            Some(f) => Self::File(f),
            None => Self::Stdout(std::io::stdout().lock()),
        }
    }

    /// Everything written: flush stdout, or move the file into place.
    pub fn finish(self) -> Result<()> {
        match self {
            Self::Stdout(mut s) => Ok(s.flush()?),
            Self::File(f) => f.commit(),
        }
    }
}

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Self::Stdout(s) => s.write(buf),
            Self::File(f) => f.file.as_mut().expect("open until committed").write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Self::Stdout(s) => s.flush(),
            Self::File(f) => f.file.as_mut().expect("open until committed").flush(),
        }
    }
}
