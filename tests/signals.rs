//! Signals win (issue 13, finding 4): an interrupt during a hung reward command is honoured within about a second
//! (no waiting out timeouts and retries), saves the last finished step and exits 130; SIGHUP is handled like
//! SIGTERM; and a reward command never outlives `safe`, not even `kill -9` of it.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::train::*;

/// A command reward that records its PID in `<pids>/`, answers deterministically (the completion's length mod 3)
/// and, with `hang_after N`, stops answering after N requests (and touches `<pids>/hung`); `close_output` closes
/// its stdout after the first request and keeps running; `no_reading` never reads its input.
const REWARD: &str = r#"
import json, os, sys, time
pids, mode, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
open(os.path.join(pids, str(os.getpid())), "w").close()
seen = 0
if mode == "close_output":
    sys.stdin.readline()
    os.close(1)
    time.sleep(3600)
if mode == "no_reading":
    time.sleep(3600)
for line in sys.stdin:
    req = json.loads(line)
    if mode == "hang_after" and seen >= n:
        open(os.path.join(pids, "hung"), "w").close()
        time.sleep(3600)
    seen += 1
    print(json.dumps({"rewards": [float(len(c) % 3) for c in req["completions"]]}), flush=True)
"#;

/// TINY with its exact-answer reward replaced by [`REWARD`] (timeout 30 s, 3 retries: 2 minutes of waiting before
/// the fix). Returns the recipe and the PID directory.
fn recipe(dir: &Path, body: &str, mode: &str, n: usize) -> (PathBuf, PathBuf) {
    let script = dir.join("reward.py");
    std::fs::write(&script, REWARD).unwrap();
    let pids = dir.join("pids");
    std::fs::create_dir_all(&pids).unwrap();
    let argv =
        format!("[\"python3\", {:?}, {:?}, {mode:?}, \"{n}\"]", script.to_str().unwrap(), pids.to_str().unwrap());
    let body = body.replace(
        "[[reward]]\nname = \"correct\"\nrule = \"exact_answer\"\n",
        &format!(
            "[[reward]]\nname = \"correct\"\nkind = \"command\"\ncommand = {argv}\ntimeout = 30.0\nmax_retries = 3\n"
        ),
    );
    (setup(dir, &body, 5), pids)
}

fn spawn_train(recipe: &Path, sets: &[&str], resume: &str) -> Child {
    let mut c = safe_cmd();
    c.args(["train", "--config", recipe.to_str().unwrap(), "--resume", resume]);
    for s in sets {
        c.args(["--set", s]);
    }
    c.stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap()
}

/// The reward processes whose PIDs were recorded and that still run (a zombie has ended).
fn alive(pids: &Path) -> Vec<i32> {
    std::fs::read_dir(pids)
        .unwrap()
        .filter_map(|e| e.unwrap().file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let cmdline = std::fs::read_to_string(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            // `pid (comm) S ...`: the state follows the closing parenthesis.
            let state = stat.rsplit_once(')').and_then(|(_, rest)| rest.trim_start().chars().next());
            cmdline.contains("reward.py") && !matches!(state, None | Some('Z') | Some('X'))
        })
        .collect()
}

/// Wait (up to 2 s) for every recorded reward process to be gone; the kernel's death signal is immediate.
fn assert_no_orphans(pids: &Path) {
    let t = Instant::now();
    while !alive(pids).is_empty() && t.elapsed() < Duration::from_secs(2) {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(alive(pids), Vec::<i32>::new(), "reward processes outlived safe");
}

fn wait_for(path: &Path, child: &mut Child) {
    let t = Instant::now();
    while !path.exists() {
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
            panic!("safe exited early ({status}): {err}");
        }
        assert!(t.elapsed() < Duration::from_secs(120), "{} never appeared", path.display());
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Send `signal` while the reward hangs in step 3: exit 130 well before any timeout, step 2 saved, no orphan.
fn interrupt_during_a_hung_reward(signal: i32) {
    let dir = tempfile::tempdir().unwrap();
    let (recipe, pids) = recipe(dir.path(), TINY, "hang_after", 2);
    let mut child = spawn_train(&recipe, &["run.save_every=0", "run.max_steps=6"], "never");
    wait_for(&pids.join("hung"), &mut child);
    let t = Instant::now();
    unsafe { libc::kill(child.id() as i32, signal) };
    let out = child.wait_with_output().unwrap();
    let took = t.elapsed();
    eprintln!("signal {signal}: exited {took:?} after it");
    assert_eq!(out.status.code(), Some(130), "{}", stderr(&out));
    // Before the fix: 4 attempts × 30 s timeout. About a second is the promise (0.2-0.5 s measured); 5 s leaves
    // room for a loaded machine.
    assert!(took < Duration::from_secs(5), "took {took:?}");
    let err = stderr(&out);
    assert!(err.contains("interrupted after step 2") && !err.contains("retry"), "{err}");
    let run = dir.path().join("runs/t");
    assert_eq!(safe::checkpoint::latest_complete(&run), Some(step_dir(&run, 2)));
    assert_eq!(metrics(&run).len(), 2, "the abandoned step logs nothing");
    let status = common::read_json(&run.join("status.json"));
    assert_eq!((status["status"].as_str(), status["step"].as_u64()), (Some("interrupted"), Some(2)), "{status}");
    assert!(status["message"].as_str().unwrap().contains("interrupted after step 2"), "{status}");
    assert_no_orphans(&pids);
}

#[test]
fn sigterm_during_a_hung_reward_command_exits_130_at_once_saving_the_last_step() {
    interrupt_during_a_hung_reward(libc::SIGTERM);
}

#[test]
fn sighup_is_handled_like_sigterm() {
    interrupt_during_a_hung_reward(libc::SIGHUP);
}

#[test]
fn kill_9_of_safe_leaves_no_orphaned_reward_command() {
    let dir = tempfile::tempdir().unwrap();
    let (recipe, pids) = recipe(dir.path(), TINY, "hang_after", 1);
    let mut child = spawn_train(&recipe, &[], "never");
    wait_for(&pids.join("hung"), &mut child);
    assert_eq!(alive(&pids).len(), 1);
    use safe::train::status::{observe, RunState};
    let run = dir.path().join("runs/t");
    assert_eq!(observe(&run).state, RunState::Running);
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert_no_orphans(&pids);
    // status.json still says running, but nobody holds the run's lock any more.
    assert_eq!(common::read_json(&run.join("status.json"))["status"], "running");
    assert_eq!(observe(&run).state, RunState::Killed);
}

#[test]
fn twenty_kill_9s_with_a_command_reward_then_resume_equal_an_uninterrupted_run() {
    let dir = tempfile::tempdir().unwrap();
    let body = TINY
        .replace("max_steps = 6", "max_steps = 40")
        .replace("save_every = 3", "save_every = 1")
        .replace("max_new_tokens = 6", "max_new_tokens = 24");
    let (recipe, pids) = recipe(dir.path(), &body, "answer", 0);
    // From the moment its reward command is up (set-up done), so the kills fall across the steps.
    let wait_for_reward_command = |child: &mut Child, started: usize| {
        let t = Instant::now();
        while std::fs::read_dir(&pids).unwrap().count() == started && t.elapsed() < Duration::from_secs(60) {
            if child.try_wait().unwrap().is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    };
    let mut child = spawn_train(&recipe, &["run.name=straight"], "never");
    wait_for_reward_command(&mut child, 0);
    let t = Instant::now();
    ok(&child.wait_with_output().unwrap());
    // Kill delays scale with this machine's step time (a fixed 0-300 ms let a fast CI machine finish all 40 steps
    // in 14 rounds): uniform over 0-1.6 steps, so each round advances under a step on average and 20 rounds never
    // reach the end, while the moments still fall in every phase of a step (rollout, reward, update, save).
    let step_ms = (t.elapsed().as_millis() as u64 / 40).max(1);
    let run = dir.path().join("runs/killed");
    // Moments from the clock (printed, so a failure can be replayed by hand).
    let mut seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64;
    eprintln!("kill seed {seed}; {step_ms} ms a step");
    let mut landed = 0;
    for round in 0..20 {
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let delay_ms = (seed >> 33) % (step_ms * 16 / 10 + 1);
        let started = std::fs::read_dir(&pids).unwrap().count();
        let mut child = spawn_train(&recipe, &["run.name=killed"], if round == 0 { "never" } else { "auto" });
        wait_for_reward_command(&mut child, started);
        std::thread::sleep(Duration::from_millis(delay_ms));
        if child.try_wait().unwrap().is_none() {
            child.kill().unwrap(); // SIGKILL, wherever it lands: loading, rollout, reward, update, save
            landed += 1;
        }
        child.wait().unwrap();
        assert_no_orphans(&pids);
        eprintln!(
            "round {round}: killed after {delay_ms} ms; newest checkpoint {:?}",
            safe::checkpoint::latest_complete(&run)
        );
    }
    assert!(landed >= 15, "only {landed} of 20 kills landed while safe ran");
    let out = train(&recipe, &["run.name=killed"], "auto");
    ok(&out);
    assert_no_orphans(&pids);
    let straight = dir.path().join("runs/straight");
    assert_eq!(checkpoint_bytes(&step_dir(&run, 40)), checkpoint_bytes(&step_dir(&straight, 40)));
    assert_eq!(metrics(&run), metrics(&straight));
}

#[test]
fn sigterm_during_a_long_rollout_abandons_it_at_once() {
    // 1024 completions one at a time: minutes of rollout before the first reward request.
    let dir = tempfile::tempdir().unwrap();
    let (recipe, pids) = recipe(dir.path(), TINY, "answer", 0);
    let sets = [
        "rollout.prompts_per_step=64",
        "rollout.num_generations=16",
        "rollout.batch_size=1",
        "rollout.max_new_tokens=48",
    ];
    let mut child = spawn_train(&recipe, &sets, "never");
    let t = Instant::now();
    while std::fs::read_dir(&pids).unwrap().count() == 0 {
        assert!(child.try_wait().unwrap().is_none() && t.elapsed() < Duration::from_secs(60), "safe did not start");
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(500));
    let t = Instant::now();
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130), "{}", stderr(&out));
    assert!(t.elapsed() < Duration::from_secs(10), "took {:?}", t.elapsed());
    assert!(stderr(&out).contains("interrupted before the first step finished"), "{}", stderr(&out));
    assert_eq!(safe::checkpoint::latest_complete(&dir.path().join("runs/t")), None);
    assert_no_orphans(&pids);
}

/// A misbehaving command with a 2 s timeout and no retry: the step fails on the timeout (not later), and a
/// SIGTERM meanwhile is honoured at once; before, safe blocked in a write to, or a wait on, the child.
fn misbehaving_command_is_bounded_by_its_timeout(mode: &str, data: Option<String>) {
    let dir = tempfile::tempdir().unwrap();
    let (recipe, pids) = recipe(dir.path(), TINY, mode, 0);
    let text = std::fs::read_to_string(&recipe)
        .unwrap()
        .replace("timeout = 30.0\nmax_retries = 3", "timeout = 2.0\nmax_retries = 0");
    std::fs::write(&recipe, text).unwrap();
    if let Some(data) = data {
        std::fs::write(dir.path().join("data.jsonl"), data).unwrap();
    }
    let t = Instant::now();
    let out = train(&recipe, &["run.max_steps=1", "run.max_bad_steps=0"], "never");
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(t.elapsed() < Duration::from_secs(20), "took {:?}", t.elapsed());
    // Signalled mid-wait: exit 130 at once.
    let child = spawn_train(&recipe, &["run.name=sig"], "never");
    let t0 = Instant::now();
    while std::fs::read_dir(&pids).unwrap().count() < 2 && t0.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(700));
    let t = Instant::now();
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130), "{}", stderr(&out));
    assert!(t.elapsed() < Duration::from_secs(5), "took {:?}", t.elapsed());
    assert_no_orphans(&pids);
}

#[test]
fn a_reward_command_that_closes_its_output_is_not_waited_on() {
    misbehaving_command_is_bounded_by_its_timeout("close_output", None);
}

#[test]
fn a_reward_command_that_does_not_read_its_input_is_not_written_to_forever() {
    // Rows with a 200 KB column: the request is bigger than a pipe's buffer, so the write itself blocks.
    let data = (0..5)
        .map(|i| {
            format!(
                "{{\"prompt\": \"What is {i} + 1?\", \"answer\": \"{}\", \"meta\": \"{}\"}}\n",
                i + 1,
                "m".repeat(200_000)
            )
        })
        .collect();
    misbehaving_command_is_bounded_by_its_timeout("no_reading", Some(data));
}

#[test]
fn sighup_stays_ignored_under_nohup() {
    use std::os::unix::process::CommandExt;
    let dir = tempfile::tempdir().unwrap();
    let (recipe, pids) = recipe(dir.path(), TINY, "hang_after", 2);
    let mut c = safe_cmd();
    c.args(["train", "--config", recipe.to_str().unwrap(), "--resume", "never", "--set", "run.save_every=0"]);
    c.stdout(Stdio::null()).stderr(Stdio::piped());
    // What `nohup` does: SIGHUP ignored before exec.
    unsafe {
        c.pre_exec(|| {
            libc::signal(libc::SIGHUP, libc::SIG_IGN);
            Ok(())
        });
    }
    let mut child = c.spawn().unwrap();
    wait_for(&pids.join("hung"), &mut child);
    unsafe { libc::kill(child.id() as i32, libc::SIGHUP) };
    std::thread::sleep(Duration::from_millis(500));
    assert!(child.try_wait().unwrap().is_none(), "SIGHUP stopped a run started under nohup");
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130), "{}", stderr(&out));
}
