//! Every recipe in configs/ is valid, and every one that needs no download trains for two steps as shipped (the
//! HTTP example against scripts/reward-server.py on a free port).

mod common;

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::train::*;

fn configs() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs");
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
    out.sort();
    out
}

/// Kills the example reward server when the test ends.
struct Server(std::process::Child);
impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn every_config_checks_and_the_download_free_ones_train() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let gguf = common::smollm2_gguf();
    let mut server = Command::new("python3")
        .args(["scripts/reward-server.py", "--port", "0"])
        .current_dir(root)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(server.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let _server = Server(server);
    let port = line.trim().strip_prefix("listening on ").unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let mut trained = 0;
    for config in configs() {
        let text = std::fs::read_to_string(&config).unwrap();
        let needs_gguf = text.lines().any(|l| {
            let value = l.split('#').next().unwrap_or("");
            value.trim_start().starts_with("id =") && value.contains(".gguf")
        });
        let mut sets = vec![format!("run.output_dir={}", dir.path().display()), "run.max_steps=2".to_string()];
        if needs_gguf {
            sets.push(format!("model.id={}", gguf.display()));
        }
        if text.contains("kind = \"http\"") {
            sets.push(format!("reward.0.urls=[\"http://127.0.0.1:{port}/score\"]"));
        }
        let mut check = safe_cmd();
        check.current_dir(root).args(["check", "--config", config.to_str().unwrap()]);
        sets.iter().for_each(|s| {
            check.args(["--set", s]);
        });
        ok(&check.output().unwrap());
        if needs_gguf {
            continue; // SmolLM2 steps take tens of seconds: the training loop is tested on it elsewhere
        }
        let mut c = safe_cmd();
        c.current_dir(root).args(["train", "--config", config.to_str().unwrap(), "--resume", "never"]);
        sets.iter().for_each(|s| {
            c.args(["--set", s]);
        });
        let out = c.output().unwrap();
        ok(&out);
        assert!(String::from_utf8_lossy(&out.stdout).contains("step     2 |"), "{}", config.display());
        trained += 1;
    }
    assert!(trained >= 6, "only {trained} configs trained");
}
