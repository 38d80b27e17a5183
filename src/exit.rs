//! Process exit codes. Scripts rely on these; `safe --help` and README.md document them.

/// Success.
pub const SUCCESS: i32 = 0;
/// A failure during training (after it started). The last good checkpoint is kept.
pub const TRAINING_FAILED: i32 = 1;
/// Bad invocation, recipe, data or model: nothing was trained. clap's own usage errors use 2 as well.
pub const BAD_INPUT: i32 = 2;
/// Interrupted by SIGINT/SIGTERM, after state was saved.
pub const INTERRUPTED: i32 = 130;

/// The exit-code table as `--help` prints it.
pub const HELP: &str = "\
Exit codes:
  0    success
  1    failure during training (the last good checkpoint is kept)
  2    bad invocation, recipe, data or model (nothing was trained)
  130  interrupted (after state was saved)";

/// An error with the exit code the process should end with.
#[derive(Debug)]
pub struct Failure {
    pub code: i32,
    pub error: anyhow::Error,
}

impl Failure {
    pub fn new(code: i32, error: impl Into<anyhow::Error>) -> Self {
        Self { code, error: error.into() }
    }
    pub fn bad_input(error: impl Into<anyhow::Error>) -> Self {
        Self::new(BAD_INPUT, error)
    }
    pub fn training(error: impl Into<anyhow::Error>) -> Self {
        Self::new(TRAINING_FAILED, error)
    }
    pub fn interrupted(error: impl Into<anyhow::Error>) -> Self {
        Self::new(INTERRUPTED, error)
    }
}

impl Failure {
    /// The message for the user: every cause, outermost first, joined by `: ` (anyhow's `{:#}`), with the
    /// backtraces Candle appends to its errors under `RUST_BACKTRACE=1` left out.
    pub fn message(&self) -> String {
        let parts: Vec<String> = self
            .error
            .chain()
            .map(|cause| match cause.downcast_ref::<candle_core::Error>() {
                Some(e @ candle_core::Error::WithBacktrace { .. }) => without_backtrace(e).to_string(),
                _ => cause.to_string(),
            })
            .collect();
        parts.join(": ")
    }
}

/// A Candle error without the backtrace it carries when `RUST_BACKTRACE` is set (its `Display` prints it).
pub fn without_backtrace(e: &candle_core::Error) -> &candle_core::Error {
    match e {
        candle_core::Error::WithBacktrace { inner, .. } => without_backtrace(inner),
        other => other,
    }
}

/// `result.or_exit(exit::BAD_INPUT)?` inside functions returning `Result<_, Failure>`.
pub trait OrExit<T> {
    fn or_exit(self, code: i32) -> Result<T, Failure>;
}

impl<T, E: Into<anyhow::Error>> OrExit<T> for Result<T, E> {
    fn or_exit(self, code: i32) -> Result<T, Failure> {
        self.map_err(|e| Failure::new(code, e))
    }
}
