//! SIGINT/SIGTERM during training: the first one asks the loop to stop after the current step (it then writes a
//! checkpoint and exits 130); a second one exits 130 at once, without saving (the last checkpoint stays intact:
//! checkpoints are written atomically).

use std::sync::atomic::{AtomicBool, Ordering};

static REQUESTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    // Only async-signal-safe work here: an atomic swap and _exit.
    if REQUESTED.swap(true, Ordering::SeqCst) {
        unsafe { libc::_exit(crate::exit::INTERRUPTED) };
    }
}

/// Install the handlers (idempotent).
pub fn install() {
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as usize;
        action.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut action.sa_mask);
        for sig in [libc::SIGINT, libc::SIGTERM] {
            libc::sigaction(sig, &action, std::ptr::null_mut());
        }
    }
}

/// Whether a stop was requested.
pub fn requested() -> bool {
    REQUESTED.load(Ordering::SeqCst)
}
