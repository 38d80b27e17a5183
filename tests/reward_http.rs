//! The `http` reward source against a real HTTP server on 127.0.0.1 started by the test: success, a slow answer
//! past the timeout then success on retry, HTTP 500, malformed JSON, the wrong number of rewards, a NaN reward.
//! Each ends in success after a retry or in an error naming the URL, and never in a partial batch.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use safe::reward::http::HttpSource;
use safe::reward::{RewardInput, RewardSource};
use safe::rollout::FinishReason;
use serde_json::{json, Map, Value};

/// What the server does with its n-th request (0-based): (delay, HTTP status, body). `body` gets the request JSON.
type Behaviour = Arc<dyn Fn(usize, &Value) -> (Duration, u16, String) + Send + Sync>;

/// Serve on an ephemeral port until the test ends; returns the URL and the request counter.
fn serve(behaviour: Behaviour) -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/score", listener.local_addr().unwrap());
    let count = Arc::new(AtomicUsize::new(0));
    let counter = count.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let n = counter.fetch_add(1, Ordering::SeqCst);
            let behaviour = behaviour.clone();
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut length = 0;
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                        length = v.trim().parse().unwrap();
                    }
                    if line == "\r\n" {
                        break;
                    }
                }
                let mut body = vec![0; length];
                reader.read_exact(&mut body).unwrap();
                let request: Value = serde_json::from_slice(&body).unwrap();
                let (delay, status, answer) = behaviour(n, &request);
                std::thread::sleep(delay);
                let reply = format!(
                    "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{answer}",
                    answer.len()
                );
                let _ = stream.write_all(reply.as_bytes());
            });
        }
    });
    (url, count)
}

/// rewards = length of each query; labels echoed in extra_logs.
fn good(request: &Value) -> String {
    let rewards: Vec<f64> =
        request["query"].as_array().unwrap().iter().map(|q| q.as_str().unwrap().len() as f64).collect();
    let labelled = request["labels"].as_array().unwrap().iter().filter(|l| !l.is_null()).count();
    json!({"rewards": rewards, "scores": rewards, "extra_logs": {"labelled": labelled}}).to_string()
}

fn batch<'a>(cols: &'a [Map<String, Value>]) -> Vec<RewardInput<'a>> {
    ["a", "bb", "ccc", "dddd"]
        .iter()
        .zip(cols)
        .map(|(c, cols)| RewardInput {
            prompt: "q:",
            raw_prompt: None,
            completion: c,
            completion_ids: &[],
            finish: FinishReason::Eos,
            columns: cols,
        })
        .collect()
}

fn columns() -> Vec<Map<String, Value>> {
    (0..4).map(|i| if i % 2 == 0 { json!({"answer": i}) } else { json!({}) }.as_object().unwrap().clone()).collect()
}

fn source(urls: &[String], timeout_ms: u64, retries: usize) -> HttpSource {
    HttpSource::new("srv", urls, "answer", Duration::from_millis(timeout_ms), retries).unwrap()
}

#[test]
fn success_with_the_batch_split_across_servers() {
    let (a, na) = serve(Arc::new(|_, r| (Duration::ZERO, 200, good(r))));
    let (b, nb) = serve(Arc::new(|_, r| (Duration::ZERO, 200, good(r))));
    let cols = columns();
    let src = source(&[a, b], 5000, 0);
    // query = prompt + completion: "q:a" … "q:dddd".
    assert_eq!(src.score(&batch(&cols)).unwrap(), vec![Some(3.0), Some(4.0), Some(5.0), Some(6.0)]);
    assert_eq!((na.load(Ordering::SeqCst), nb.load(Ordering::SeqCst)), (1, 1));
    // Each server saw one labelled row of its two; extra_logs are averaged over the servers.
    assert_eq!(src.metrics(), vec![("labelled".to_string(), 1.0)]);
}

#[test]
fn a_slow_answer_times_out_then_the_retry_succeeds() {
    let (url, n) = serve(Arc::new(|i, r| (if i == 0 { Duration::from_secs(3) } else { Duration::ZERO }, 200, good(r))));
    let cols = columns();
    let got = source(&[url], 400, 2).score(&batch(&cols)).unwrap();
    assert_eq!(got.len(), 4);
    assert_eq!(n.load(Ordering::SeqCst), 2);
}

#[test]
fn http_500_once_is_retried_and_persistent_failures_name_the_url() {
    let cols = columns();
    let (url, _) =
        serve(Arc::new(
            |i, r| if i == 0 { (Duration::ZERO, 500, "oops".into()) } else { (Duration::ZERO, 200, good(r)) },
        ));
    assert_eq!(source(&[url], 5000, 1).score(&batch(&cols)).unwrap().len(), 4);

    let cases: [(Behaviour, &str); 4] = [
        (Arc::new(|_, _| (Duration::ZERO, 500, "\"internal\"".into())), "HTTP 500"),
        (Arc::new(|_, _| (Duration::ZERO, 200, "{\"rewards\": [1, 2".into())), "not valid JSON"),
        (Arc::new(|_, _| (Duration::ZERO, 200, "{\"rewards\": [1, 2, 3]}".into())), "3 rewards for a batch of 4"),
        (Arc::new(|_, _| (Duration::ZERO, 200, "{\"rewards\": [1, NaN, 3, 4]}".into())), "non-finite"),
    ];
    for (behaviour, needle) in cases {
        let (url, n) = serve(behaviour);
        let e = format!("{:#}", source(std::slice::from_ref(&url), 5000, 1).score(&batch(&cols)).unwrap_err());
        assert!(e.contains(&url) && e.contains("after 2 attempt(s)") && e.contains(needle), "{e}");
        assert_eq!(n.load(Ordering::SeqCst), 2, "one retry");
    }
    // A 4xx other than 429 is not retried.
    let (url, n) = serve(Arc::new(|_, _| (Duration::ZERO, 400, "bad request".into())));
    let e = format!("{:#}", source(&[url], 5000, 3).score(&batch(&cols)).unwrap_err());
    assert!(e.contains("HTTP 400") && e.contains("after 1 attempt(s)"), "{e}");
    assert_eq!(n.load(Ordering::SeqCst), 1);
}

#[test]
fn one_failing_server_fails_the_whole_batch() {
    let cols = columns();
    let (good_url, _) = serve(Arc::new(|_, r| (Duration::ZERO, 200, good(r))));
    let (bad_url, _) = serve(Arc::new(|_, _| (Duration::ZERO, 503, "down".into())));
    let e = format!("{:#}", source(&[good_url, bad_url.clone()], 5000, 0).score(&batch(&cols)).unwrap_err());
    assert!(e.contains(&bad_url) && e.contains("HTTP 503"), "{e}");
    // A URL that is not http(s) is refused up front.
    assert!(HttpSource::new("srv", &["ftp://x".into()], "answer", Duration::from_secs(1), 0).is_err());
}
