//! `kind = "http"`: reward servers with OpenRLHF's remote reward-model protocol.
//!
//! The batch is split into contiguous shares, one per URL, posted concurrently as JSON
//! `{"query": [prompt + completion, ...], "prompts": [...], "labels": [...]}` (labels from the data column
//! `label_field`, null where a row has none). A server answers `{"rewards": [...]}` (number or null per sample),
//! optionally with `"scores"` (ignored) and `"extra_logs": {"<name>": [...] | number}` (logged as
//! `rewards/<reward>/<name>`, the mean of a list).
//!
//! Each share has a timeout and is retried with exponential back-off (0.25 s, 0.5 s, 1 s, ...) after a transport
//! error, an HTTP 429 or 5xx, or an answer that does not validate (not JSON, a non-finite number, the wrong number
//! of rewards). Other 4xx answers are not retried. If any share still fails, the whole batch fails with an error
//! naming the URL: no step trains on a partial batch of rewards.
//!
//! Shares run on their own threads while the caller waits in [`signal::POLL`] slices: a stop request (Ctrl-C,
//! SIGTERM) abandons the batch at once (the requests in flight are left to end on their own), and back-offs wake
//! for it too, so no retry starts after an interrupt.

use std::sync::{mpsc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, bail, Result};
use serde_json::Value;

use super::answer::{parse_answer, Answer};
use super::{RewardInput, RewardSource};
use crate::signal;

pub struct HttpSource {
    name: String,
    urls: Vec<String>,
    label_field: String,
    client: Client,
    metrics: Mutex<Vec<(String, f64)>>,
}

/// What a share's thread needs, owned (a share outlives the call that started it when the call is interrupted).
#[derive(Clone)]
struct Client {
    name: String,
    max_retries: usize,
    backoff: Duration,
    agent: ureq::Agent,
}

/// Why an attempt failed, and whether trying again may help.
struct Attempt {
    error: anyhow::Error,
    retry: bool,
}

impl HttpSource {
    pub fn new(name: &str, urls: &[String], label_field: &str, timeout: Duration, max_retries: usize) -> Result<Self> {
        if urls.is_empty() {
            bail!("reward `{name}`: no URL");
        }
        for u in urls {
            if !(u.starts_with("http://") || u.starts_with("https://")) {
                bail!("reward `{name}`: `{u}` is not an http:// or https:// URL");
            }
        }
        Ok(Self {
            name: name.to_string(),
            urls: urls.to_vec(),
            label_field: label_field.to_string(),
            client: Client {
                name: name.to_string(),
                max_retries,
                backoff: Duration::from_millis(250),
                agent: ureq::AgentBuilder::new().timeout(timeout).build(),
            },
            metrics: Mutex::new(Vec::new()),
        })
    }

    /// The request body for a share of the batch.
    fn body(&self, share: &[RewardInput]) -> String {
        let query: Vec<String> = share.iter().map(|b| format!("{}{}", b.prompt, b.completion)).collect();
        let prompts: Vec<&str> = share.iter().map(|b| b.prompt).collect();
        let labels: Vec<Value> =
            share.iter().map(|b| b.columns.get(&self.label_field).cloned().unwrap_or(Value::Null)).collect();
        serde_json::json!({ "query": query, "prompts": prompts, "labels": labels }).to_string()
    }
}

impl Client {
    fn attempt(&self, url: &str, body: &str, n: usize) -> Result<Answer, Attempt> {
        let transient = |error: anyhow::Error| Attempt { error, retry: true };
        let response = match self.agent.post(url).set("Content-Type", "application/json").send_string(body) {
            Ok(r) => r,
            Err(ureq::Error::Status(code, r)) => {
                let text: String = r.into_string().unwrap_or_default().chars().take(200).collect();
                let error = anyhow!("HTTP {code}: {text:?}");
                return Err(Attempt { error, retry: code == 429 || code >= 500 });
            }
            Err(ureq::Error::Transport(t)) => return Err(transient(anyhow!("{t}"))),
        };
        let text = response.into_string().map_err(|e| transient(anyhow!("reading the answer: {e}")))?;
        parse_answer(&text, n, "extra_logs").map_err(transient)
    }

    /// One share: attempts with back-off until success, a permanent error, `max_retries` retries, or a stop request.
    fn post(&self, url: &str, body: &str, n: usize) -> Result<Answer> {
        let mut tries = 0;
        loop {
            match self.attempt(url, body, n) {
                Ok(v) => return Ok(v),
                Err(a) if a.retry && tries < self.max_retries => {
                    eprintln!(
                        "warning: reward `{}`: {url}: {:#}; retrying ({} of {})",
                        self.name,
                        a.error,
                        tries + 1,
                        self.max_retries
                    );
                    signal::sleep(self.backoff * 2u32.saturating_pow(tries as u32))?;
                    tries += 1;
                }
                Err(a) => {
                    return Err(a.error.context(format!("{url} failed after {} attempt(s)", tries + 1)));
                }
            }
        }
    }
}

impl RewardSource for HttpSource {
    fn name(&self) -> &str {
        &self.name
    }

    fn score(&self, batch: &[RewardInput]) -> Result<Vec<Option<f64>>> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        // Contiguous shares, one per URL (fewer when the batch is smaller than the URL list).
        let k = self.urls.len().min(batch.len());
        let size = batch.len().div_ceil(k);
        let (tx, rx) = mpsc::channel();
        let mut pending = 0;
        for (i, (url, share)) in self.urls.iter().zip(batch.chunks(size)).enumerate() {
            let (client, url, body, n, tx) =
                (self.client.clone(), url.clone(), self.body(share), share.len(), tx.clone());
            std::thread::spawn(move || {
                let _ = tx.send((i, client.post(&url, &body, n)));
            });
            pending += 1;
        }
        drop(tx);
        let mut answers: Vec<Option<Result<Answer>>> = (0..pending).map(|_| None).collect();
        while answers.iter().any(Option::is_none) {
            signal::check()?;
            match rx.recv_timeout(signal::POLL) {
                Ok((i, answer)) => answers[i] = Some(answer),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => bail!("reward `{}`: a request thread panicked", self.name),
            }
        }
        let answers = answers.into_iter().map(|a| a.expect("every share answered"));
        let mut rewards = Vec::with_capacity(batch.len());
        let mut logs: Vec<(String, f64, usize)> = Vec::new();
        for answer in answers {
            let (r, l) = answer?;
            rewards.extend(r);
            for (name, v) in l {
                match logs.iter_mut().find(|(n, _, _)| *n == name) {
                    Some(slot) => {
                        slot.1 += v;
                        slot.2 += 1;
                    }
                    None => logs.push((name, v, 1)),
                }
            }
        }
        *self.metrics.lock().unwrap() = logs.into_iter().map(|(n, v, c)| (n, v / c as f64)).collect();
        Ok(rewards)
    }

    fn metrics(&self) -> Vec<(String, f64)> {
        std::mem::take(&mut *self.metrics.lock().unwrap())
    }
}
