//! `kind = "command"`: a long-lived child process that scores batches over JSON lines.
//!
//! Protocol, one line each way per batch:
//! - request: `{"prompts": [...], "completions": [...], "completion_ids": [[...]], "finish_reasons": [...],
//!   "<column>": [...], ...}` with one entry per sample; every data column (e.g. `answer`) is a list under its own
//!   name, as TRL passes columns to reward functions (the four names above take precedence over columns);
//! - answer: `{"rewards": [number | null, ...]}` (null = not applicable), optionally with
//!   `"metrics": {"<name>": [number, ...] | number}`, logged as `rewards/<reward>/<name>` (the mean of a list).
//!
//! The process is started when the run starts (a command that cannot start is bad input), its stderr is forwarded
//! to ours line by line, and each request has a timeout. A request that times out, finds the process dead, or gets
//! a malformed answer kills and restarts the process and is sent again, up to `max_retries` times; after that the
//! batch fails with an error naming the command (the step is skipped; see `run.max_bad_steps`).
//!
//! The wait for an answer wakes every [`signal::POLL`]: a stop request (Ctrl-C, SIGTERM) abandons it at once and
//! starts no retry. The process is tied to ours ([`crate::child`]): it is killed when `safe` ends, even by SIGKILL.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{Map, Value};

use super::answer::{parse_answer, Answer};
use super::{RewardInput, RewardSource};
use crate::signal;

pub struct CommandSource {
    name: String,
    argv: Vec<String>,
    timeout: Duration,
    max_retries: usize,
    process: Mutex<Option<Process>>,
    metrics: Mutex<Vec<(String, f64)>>,
}

struct Process {
    child: Child,
    /// Requests go through a writer thread: a child that does not read its input blocks that thread (until the
    /// child is killed), never the wait for its answer.
    requests: mpsc::Sender<String>,
    /// A write the writer thread could not make.
    write_errors: Receiver<std::io::Error>,
    lines: Receiver<std::io::Result<String>>,
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl CommandSource {
    /// Start the command. `argv[0]` is the program (looked up in PATH), the rest its arguments.
    pub fn new(name: &str, argv: &[String], timeout: Duration, max_retries: usize) -> Result<Self> {
        if argv.is_empty() {
            bail!("reward `{name}`: the command is empty");
        }
        let source = Self {
            name: name.to_string(),
            argv: argv.to_vec(),
            timeout,
            max_retries,
            process: Mutex::new(None),
            metrics: Mutex::new(Vec::new()),
        };
        *source.process.lock().unwrap() = Some(source.spawn()?);
        Ok(source)
    }

    fn describe(&self) -> String {
        self.argv.join(" ")
    }

    fn spawn(&self) -> Result<Process> {
        let mut command = Command::new(&self.argv[0]);
        command.args(&self.argv[1..]).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = crate::child::spawn(command)
            .with_context(|| format!("reward `{}`: cannot start `{}`", self.name, self.describe()))?;
        let stdin = child.stdin.take().expect("piped");
        let stdout = child.stdout.take().expect("piped");
        let (requests, inbox) = mpsc::channel::<String>();
        let (failed, write_errors) = mpsc::channel();
        std::thread::spawn(move || {
            let mut stdin: ChildStdin = stdin;
            for request in inbox {
                if let Err(e) = writeln!(stdin, "{request}").and_then(|_| stdin.flush()) {
                    let _ = failed.send(e);
                    break;
                }
            }
        });
        let stderr = child.stderr.take().expect("piped");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let tag = format!("[reward {}] ", self.name);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("{tag}{line}");
            }
        });
        Ok(Process { child, requests, write_errors, lines })
    }

    /// One request on a running process.
    fn exchange(&self, p: &mut Process, request: &str, n: usize) -> Result<Answer> {
        p.requests.send(request.to_string()).map_err(|_| anyhow::anyhow!("it does not read its input"))?;
        let deadline = Instant::now() + self.timeout;
        let line = loop {
            signal::check()?;
            if let Ok(e) = p.write_errors.try_recv() {
                bail!("it does not read its input ({e})");
            }
            let wait = deadline.saturating_duration_since(Instant::now()).min(signal::POLL);
            match p.lines.recv_timeout(wait) {
                Ok(Ok(line)) => break line,
                Ok(Err(e)) => bail!("reading its answer: {e}"),
                Err(RecvTimeoutError::Timeout) if Instant::now() < deadline => continue,
                Err(RecvTimeoutError::Timeout) => bail!("no answer within {:.1} s", self.timeout.as_secs_f64()),
                Err(RecvTimeoutError::Disconnected) => {
                    // Its output is closed; it may still run. Never wait on it unbounded (it is killed on retry).
                    let status = exit_status_soon(&mut p.child);
                    if status.as_ref().is_some_and(killed_by_a_stop_signal) {
                        // Ctrl-C reaches the whole process group: the child may die of it a moment before our
                        // handler has run. Give the handler that moment, so the step is abandoned, not failed.
                        let t = Instant::now();
                        while !signal::requested() && t.elapsed() < Duration::from_millis(500) {
                            std::thread::sleep(Duration::from_millis(10));
                        }
                        signal::check()?;
                    }
                    match status {
                        Some(s) => bail!("it exited ({s}) without answering"),
                        None => bail!("it closed its output without answering"),
                    }
                }
            }
        };
        parse_answer(&line, n, "metrics")
    }
}

/// The child's exit status if it ends within a moment (a closed output usually means it is exiting).
fn exit_status_soon(child: &mut Child) -> Option<std::process::ExitStatus> {
    let t = Instant::now();
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if t.elapsed() > Duration::from_millis(200) {
            return None;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Whether a status is death by SIGINT, SIGTERM or SIGHUP: the signals that also stop `safe`.
fn killed_by_a_stop_signal(status: &std::process::ExitStatus) -> bool {
    use std::os::unix::process::ExitStatusExt;
    matches!(status.signal(), Some(libc::SIGINT | libc::SIGTERM | libc::SIGHUP))
}

/// The request line for a batch: prompts, completions, ids, finish reasons, and every data column as a list.
pub fn request_line(batch: &[RewardInput]) -> String {
    let mut obj = Map::new();
    let mut columns: Vec<&String> = batch.iter().flat_map(|b| b.columns.keys()).collect();
    columns.sort();
    columns.dedup();
    for c in columns {
        obj.insert(c.clone(), batch.iter().map(|b| b.columns.get(c).cloned().unwrap_or(Value::Null)).collect());
    }
    obj.insert("prompts".into(), batch.iter().map(|b| Value::from(b.prompt)).collect());
    obj.insert("completions".into(), batch.iter().map(|b| Value::from(b.completion)).collect());
    obj.insert("completion_ids".into(), batch.iter().map(|b| Value::from(b.completion_ids.to_vec())).collect());
    obj.insert(
        "finish_reasons".into(),
        batch.iter().map(|b| serde_json::to_value(b.finish).unwrap_or(Value::Null)).collect(),
    );
    Value::Object(obj).to_string()
}

impl RewardSource for CommandSource {
    fn name(&self) -> &str {
        &self.name
    }

    fn score(&self, batch: &[RewardInput]) -> Result<Vec<Option<f64>>> {
        let request = request_line(batch);
        let mut guard = self.process.lock().unwrap();
        let mut last = None;
        for attempt in 0..=self.max_retries {
            signal::check()?;
            if guard.is_none() {
                match self.spawn() {
                    Ok(p) => *guard = Some(p),
                    Err(e) => {
                        last = Some(e);
                        continue;
                    }
                }
            }
            let p = guard.as_mut().expect("started above");
            match self.exchange(p, &request, batch.len()) {
                Ok((rewards, metrics)) => {
                    *self.metrics.lock().unwrap() = metrics;
                    return Ok(rewards);
                }
                Err(e) if signal::is(&e) => {
                    *guard = None; // killed: it may be half-way through the abandoned batch
                    return Err(e);
                }
                Err(e) => {
                    if attempt < self.max_retries {
                        eprintln!(
                            "warning: reward `{}`: `{}` failed ({e:#}); restarting it (retry {} of {})",
                            self.name,
                            self.describe(),
                            attempt + 1,
                            self.max_retries
                        );
                    }
                    *guard = None; // kills it
                    last = Some(e);
                }
            }
        }
        let e = last.expect("at least one attempt");
        bail!("command `{}` failed {} times; last: {e:#}", self.describe(), self.max_retries + 1)
    }

    fn metrics(&self) -> Vec<(String, f64)> {
        std::mem::take(&mut *self.metrics.lock().unwrap())
    }
}
