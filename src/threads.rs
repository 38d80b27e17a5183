//! The CPU threads and how the kernel schedules them: set once, first thing in `main`, the one place that decides.
//!
//! Measured on a 2-core Intel Xeon (`cargo bench --bench matmul -- --summary` beside a `nice -n 19` busy loop pinned to
//! one core): Candle's matmul fell from 330 to 250 GFLOP/s while torch's kept 97% of its rate. Two causes, two
//! levers:
//! - Every parallel section was handed from `main` (outside the pool) to the rayon workers and waited for, so the
//!   thread that owns the work slept and woke on every matmul. [`on_pool`] runs the program on a pool thread: the
//!   work is split and stolen there, and the caller computes its share instead of sleeping.
//! - A woken (or yielding) thread waits for whatever holds its core to finish its slice (EEVDF, Linux 6.6+). Our
//!   threads ask for a short slice (`sched_setattr`, unprivileged for normal-policy threads), so on waking they
//!   take the core back at once; their share of the CPU is unchanged. Kernels without custom slices ignore it.
//!
//! Together: 250 → 300 GFLOP/s beside the busy process, no change quiet; in a GRPO run, decoding beside it slowed
//! 4% instead of 20%.
//!
//! Two more, in the vendored crates: Candle's elementwise ops run on this pool rather than on a second one that
//! spun on the shared core (vendor/candle-core/PATCHED.md), and an idle rayon worker spins instead of yielding
//! its core to the other process (vendor/rayon-core/PATCHED.md): a GRPO step beside a `nice -n 19` busy loop
//! 5.39 → 4.94 s on a 2-core AMD EPYC (medians of three alternated runs each, the spin alone).

/// The slice asked for, in microseconds (the kernel's minimum is 100); `SAFE_SCHED_SLICE_US` overrides, 0 leaves
/// the kernel's default.
const SLICE_US: u64 = 100;

fn env_usize(name: &str) -> Option<usize> {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok())
}

/// Fix the threads once, before any other thread exists: the rayon pool (`RAYON_NUM_THREADS` if set, else the
/// CPUs this process may use; it runs Candle's elementwise ops too, vendor/candle-core/PATCHED.md), the pool of
/// Candle's quantized kernels (`CANDLE_NUM_THREADS`, default the same) and the short
/// scheduling slice, which threads started later inherit. Candle reads `RAYON_NUM_THREADS` on every matmul and,
/// unset, recomputes the CPU count from /proc and /sys each time (a quarter of batch-1 decode time), so it is
/// always set here.
pub fn init_threads() {
    let threads = env_usize("RAYON_NUM_THREADS")
        .filter(|&n| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1));
    let slice_ns = env_usize("SAFE_SCHED_SLICE_US").map_or(SLICE_US, |n| n as u64) * 1000;
    if slice_ns > 0 {
        set_slice(slice_ns);
    }
    std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    if env_usize("CANDLE_NUM_THREADS").filter(|&n| n > 0).is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", threads.to_string());
    }
    // An error means a pool exists already (a test harness built one): keep it.
    let _ = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .start_handler(move |_| {
            if slice_ns > 0 {
                set_slice(slice_ns);
            }
        })
        .build_global();
}

/// Run `f` on a thread of the rayon pool (see the module's doc). With one thread it runs here: a pool of one whose
/// only thread waits on a `std` thread that needs the pool would never finish.
pub fn on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if rayon::current_num_threads() > 1 && rayon::current_thread_index().is_none() {
        rayon::scope(|_| f())
    } else {
        f()
    }
}

/// Ask for a scheduling slice of `ns` for the calling thread (EEVDF's `sched_attr.sched_runtime` for a
/// `SCHED_OTHER` thread). Best effort: an older kernel or a refusal leaves the default.
#[cfg(target_os = "linux")]
fn set_slice(ns: u64) {
    // `struct sched_attr` of sched_setattr(2), the first version's 48 bytes plus the utilisation clamps.
    #[repr(C)]
    struct SchedAttr {
        size: u32,
        policy: u32,
        flags: u64,
        nice: i32,
        priority: u32,
        runtime: u64,
        deadline: u64,
        period: u64,
        util_min: u32,
        util_max: u32,
    }
    // Keep the thread's niceness (sched_setattr sets it too).
    let nice = unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) };
    let attr = SchedAttr {
        size: std::mem::size_of::<SchedAttr>() as u32,
        policy: libc::SCHED_OTHER as u32,
        flags: 0,
        nice,
        priority: 0,
        runtime: ns,
        deadline: 0,
        period: 0,
        util_min: 0,
        util_max: 0,
    };
    // Only a thread of the normal policy: a user who chose SCHED_BATCH or SCHED_IDLE keeps it.
    if unsafe { libc::sched_getscheduler(0) } == libc::SCHED_OTHER {
        let _ = unsafe { libc::syscall(libc::SYS_sched_setattr, 0, &attr as *const SchedAttr, 0) };
    }
}

#[cfg(not(target_os = "linux"))]
fn set_slice(_ns: u64) {}

#[cfg(test)]
mod tests {
    use super::*;

    /// The slice reaches the kernel (where it has custom slices) and the niceness stays: `nice -n 10 safe ...`
    /// must stay at 10.
    #[test]
    #[cfg(target_os = "linux")]
    fn short_slice_keeps_the_niceness() {
        std::thread::spawn(|| {
            let before = unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) };
            set_slice(SLICE_US * 1000);
            assert_eq!(unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) }, before);
            let tid = unsafe { libc::syscall(libc::SYS_gettid) };
            let sched = std::fs::read_to_string(format!("/proc/self/task/{tid}/sched")).unwrap_or_default();
            if let Some(line) = sched.lines().find(|l| l.starts_with("se.slice")) {
                let ns: u64 = line.rsplit(':').next().unwrap().trim().parse().unwrap();
                assert_eq!(ns, SLICE_US * 1000, "{line}");
            }
        })
        .join()
        .unwrap();
    }

    /// `on_pool` runs its closure on a pool thread when the pool has several, runs it in place when called from a
    /// pool thread or with a pool of one, and returns its value.
    #[test]
    fn on_pool_runs_on_a_pool_thread() {
        let outside = std::thread::spawn(|| on_pool(|| (rayon::current_thread_index(), on_pool(|| 7))));
        let (index, nested) = outside.join().unwrap();
        assert_eq!(index.is_some(), rayon::current_num_threads() > 1);
        assert_eq!(nested, 7);
        let single = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
        assert_eq!(single.install(|| on_pool(rayon::current_thread_index)), Some(0));
    }

    /// Candle's parallel elementwise maps run on the caller's rayon pool (vendor/candle-core/PATCHED.md): every
    /// element is written once and right, for a length that is no multiple of the chunks, from two callers at once.
    #[test]
    fn elementwise_ops_on_the_rayon_pool_write_every_element() {
        use candle_core::{Device, Tensor};
        let n = 3 * 65_536 + 17; // above candle's parallel threshold (64k elements)
        let a: Vec<f32> = (0..n).map(|i| i as f32).collect();
        let b: Vec<f32> = (0..n).map(|i| (i % 7) as f32).collect();
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        let (sum, exp) = pool.install(|| {
            let x = Tensor::from_slice(&a, n, &Device::Cpu).unwrap();
            let y = Tensor::from_slice(&b, n, &Device::Cpu).unwrap();
            rayon::join(|| (&x + &y).unwrap().to_vec1::<f32>().unwrap(), || x.neg().unwrap().to_vec1::<f32>().unwrap())
        });
        assert!(sum.iter().enumerate().all(|(i, &v)| v == a[i] + b[i]));
        assert!(exp.iter().enumerate().all(|(i, &v)| v == -a[i]));
    }
}
