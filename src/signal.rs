//! SIGINT, SIGTERM and SIGHUP: the first asks the run to stop (the loop finishes or abandons the current step,
//! saves the last finished one and exits 130); a second exits 130 at once, without saving (the last checkpoint
//! stays intact: checkpoints are written atomically). Anything that waits (a reward command, a reward server, a
//! back-off, the rollout) polls [`requested`] at least every [`POLL`] and gives up with [`Interrupted`], so an
//! interrupt is honoured within about a second however long the wait would have been.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

static REQUESTED: AtomicBool = AtomicBool::new(false);

/// The longest a wait goes without looking at [`requested`].
pub const POLL: Duration = Duration::from_millis(100);

extern "C" fn on_signal(_: libc::c_int) {
    // Only async-signal-safe work here: an atomic swap and _exit.
    if REQUESTED.swap(true, Ordering::SeqCst) {
        unsafe { libc::_exit(crate::exit::INTERRUPTED) };
    }
}

/// Install the handlers (idempotent). A closed terminal (SIGHUP) stops the run like SIGTERM, unless SIGHUP was
/// ignored when we started (`nohup safe train ...`): that choice is kept, and the run survives the logout.
pub fn install() {
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as usize;
        action.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut action.sa_mask);
        for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            let mut old: libc::sigaction = std::mem::zeroed();
            libc::sigaction(sig, std::ptr::null(), &mut old);
            if sig == libc::SIGHUP && old.sa_sigaction == libc::SIG_IGN {
                continue;
            }
            libc::sigaction(sig, &action, std::ptr::null_mut());
        }
    }
}

/// Whether a stop was requested.
pub fn requested() -> bool {
    REQUESTED.load(Ordering::SeqCst)
}

/// The error of a wait abandoned because a stop was requested; the trainer recognises it (`is`) and ends the run
/// with exit 130 instead of counting a failed step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Interrupted;

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("interrupted (a stop was requested)")
    }
}

impl std::error::Error for Interrupted {}

/// `Err(Interrupted)` once a stop was requested.
pub fn check() -> Result<(), Interrupted> {
    if requested() {
        Err(Interrupted)
    } else {
        Ok(())
    }
}

/// Whether `e` (or anything in its chain of causes) is an [`Interrupted`].
pub fn is(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.downcast_ref::<Interrupted>().is_some())
}

/// Sleep for `d`, waking every [`POLL`] to give up early when a stop is requested.
pub fn sleep(d: Duration) -> Result<(), Interrupted> {
    let end = Instant::now() + d;
    loop {
        check()?;
        let now = Instant::now();
        if now >= end {
            return Ok(());
        }
        std::thread::sleep((end - now).min(POLL));
    }
}
