//! Data that cannot feed the rewards is refused at load (issue 13, finding 5): exit 2 naming the file, the line and
//! the column, before anything is trained; before, it was found at run time, step after step, and ended in exit 1.

mod common;

use common::train::*;

fn run_with_data(data: &str, sets: &[&str]) -> (std::process::Output, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let recipe = setup(dir.path(), TINY, 5);
    std::fs::write(dir.path().join("data.jsonl"), data).unwrap();
    (train(&recipe, sets, "never"), dir)
}

#[test]
fn a_missing_answer_column_in_every_row_is_exit_2_at_load() {
    let data: String = (0..5).map(|i| format!("{{\"prompt\": \"What is {i} + 1?\"}}\n")).collect();
    let (out, dir) = run_with_data(&data, &[]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let err = stderr(&out);
    let file = dir.path().join("data.jsonl");
    assert!(err.contains("5 data row(s) cannot feed the rewards"), "{err}");
    assert!(err.contains(&format!("{}:1: reward `correct`: no column `answer`", file.display())), "{err}");
    assert!(!dir.path().join("runs/t/metrics.jsonl").exists(), "nothing trained");
}

#[test]
fn a_bad_answer_in_one_row_is_exit_2_naming_its_line() {
    // Line 4 (after a blank line 3) has an answer with no number in it.
    let data = "{\"prompt\": \"a\", \"answer\": 1}\n{\"prompt\": \"b\", \"answer\": \"2\"}\n\n\
                {\"prompt\": \"c\", \"answer\": \"three\"}\n{\"prompt\": \"d\", \"answer\": null}\n";
    let (out, dir) = run_with_data(data, &[]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("1 data row(s)"), "{err}");
    let at = format!(
        "{}:4: reward `correct`: column `answer` has no number in \"three\"",
        dir.path().join("data.jsonl").display()
    );
    assert!(err.contains(&at), "{err}");
}
