//! Child processes (reward commands, later environments) that never outlive the run.
//!
//! A child stays in our process group (Ctrl-C at a terminal reaches it too), and on Linux asks the kernel for
//! SIGKILL when its parent dies (`PR_SET_PDEATHSIG`), so even `kill -9` of `safe` leaves no orphaned child. That
//! reaches the child alone: processes it forks itself are its to stop (a shell wrapper should `exec`). The
//! kernel ties that signal to the *thread* that forked, not the process: a child forked from a short-lived thread
//! (a reward scored on a scoped thread) would be killed when that thread ends. So every child is forked by one
//! spawner thread that lives as long as the process.

use std::io;
use std::process::{Child, Command};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};

type Job = (Command, mpsc::Sender<io::Result<Child>>);

/// Start `command` as a child tied to this process's life.
pub fn spawn(mut command: Command) -> io::Result<Child> {
    tie_to_parent(&mut command);
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<Job>>> = OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("safe-spawner".into())
            .spawn(move || {
                for (mut command, reply) in rx {
                    let _ = reply.send(command.spawn());
                }
            })
            .expect("cannot start the child-process spawner thread");
        Mutex::new(tx)
    });
    let (reply, answer) = mpsc::channel();
    let sent = spawner.lock().unwrap_or_else(|e| e.into_inner()).send((command, reply));
    sent.map_err(|_| io::Error::other("the child-process spawner thread is gone"))?;
    answer.recv().map_err(|_| io::Error::other("the child-process spawner thread is gone"))?
}

#[cfg(target_os = "linux")]
fn tie_to_parent(command: &mut Command) {
    use std::os::unix::process::CommandExt;
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: only async-signal-safe calls (prctl, getppid, _exit) between fork and exec.
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            // The parent may have died between fork and prctl: then nobody will send the signal.
            if libc::getppid() != parent {
                libc::_exit(1);
            }
            Ok(())
        });
    }
}

#[cfg(not(target_os = "linux"))]
fn tie_to_parent(_: &mut Command) {}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    /// The kernel sends the death signal when the forking thread ends; a child spawned from a thread that has since
    /// finished must still be alive.
    #[test]
    fn a_child_spawned_from_a_finished_thread_stays_alive() {
        let mut child = std::thread::spawn(|| {
            let mut c = Command::new("sleep");
            c.arg("30");
            spawn(c).unwrap()
        })
        .join()
        .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(200));
        assert!(child.try_wait().unwrap().is_none(), "the child died with the thread that asked for it");
        child.kill().unwrap();
        child.wait().unwrap();
    }
}
