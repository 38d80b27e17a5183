//! The data module: JSONL loading and its errors, the built-in arithmetic set, the seeded epoch sampler (exact
//! resume, also across epoch boundaries), prompt rendering and left truncation.

mod common;

use std::path::{Path, PathBuf};

use safe::data::{arithmetic, TruncationCounter};
use safe::data::{encode_prompt, render, sampler::epoch_order, Dataset, Example, Prompt, Sampler, SamplerState};
use safe::model::ChatMessage;
use safe::recipe::{BuiltinData, DataSettings, DataSource};

fn settings(source: DataSource, prompt_field: &str) -> DataSettings {
    DataSettings { source, prompt_field: prompt_field.into(), shuffle: true, max_prompt_tokens: 256, chat: true }
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn tokenizer() -> safe::model::Tokenizer {
    safe::model::builtin::tokenizer(&safe::model::builtin::config("tiny").unwrap(), "test").unwrap()
}

#[test]
fn jsonl_text_and_message_prompts_keep_other_columns() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(
        dir.path(),
        "d.jsonl",
        "{\"prompt\": \"2+2?\", \"answer\": \"4\", \"n\": 1}\n\n   \n\
         {\"prompt\": [{\"role\": \"system\", \"content\": \"s\"}, {\"role\": \"user\", \"content\": \"u\"}], \
         \"answer\": \"x\"}\n",
    );
    let d = Dataset::load(&settings(DataSource::Jsonl(p), "prompt")).unwrap();
    assert_eq!(d.len(), 2);
    let e = d.get(0).unwrap();
    assert_eq!((e.index, &e.prompt), (0, &Prompt::Text("2+2?".into())));
    assert_eq!(e.columns.len(), 2, "the prompt is not a column");
    assert_eq!(e.columns["answer"], "4");
    assert_eq!(e.columns["n"], 1);
    let e = d.get(1).unwrap();
    assert_eq!(e.index, 1, "blank lines are not examples");
    assert_eq!(e.prompt, Prompt::Messages(vec![ChatMessage::new("system", "s"), ChatMessage::new("user", "u")]));
    assert!(d.get(2).is_none());
}

#[test]
fn prompt_field_is_configurable() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(dir.path(), "q.jsonl", "{\"question\": \"hi\", \"prompt\": \"other\"}\n");
    let d = Dataset::load(&settings(DataSource::Jsonl(p.clone()), "question")).unwrap();
    assert_eq!(d.get(0).unwrap().prompt, Prompt::Text("hi".into()));
    assert_eq!(d.get(0).unwrap().columns["prompt"], "other");
    let e = Dataset::load(&settings(DataSource::Jsonl(write(dir.path(), "r.jsonl", "{\"prompt\": \"a\"}\n")), "q"));
    assert!(format!("{:#}", e.unwrap_err()).contains("r.jsonl:1: no `q` field"));
}

#[test]
fn bad_lines_name_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("{\"prompt\": \"a\"}\n{\"prompt\": \n", "bad.jsonl:2", "not valid JSON"),
        ("{\"prompt\": \"a\"}\n\n{\"text\": \"a\"}\n", "bad.jsonl:3", "no `prompt` field"),
        ("{\"prompt\": 3}\n", "bad.jsonl:1", "must be a string or a non-empty list of {role, content}"),
        ("{\"prompt\": [{\"role\": \"user\"}]}\n", "bad.jsonl:1", "must be a string"),
        ("{\"prompt\": []}\n", "bad.jsonl:1", "non-empty list"),
        ("[\"prompt\"]\n", "bad.jsonl:1", "not a JSON object"),
        ("", "bad.jsonl", "no examples"),
        ("\n  \n", "bad.jsonl", "no examples"),
    ];
    for (text, at, what) in cases {
        let p = write(dir.path(), "bad.jsonl", text);
        let e = format!("{:#}", Dataset::from_jsonl(&p, "prompt").unwrap_err());
        assert!(e.contains(at) && e.contains(what), "{text:?}: {e}");
    }
    let e = format!("{:#}", Dataset::from_jsonl(&dir.path().join("absent.jsonl"), "prompt").unwrap_err());
    assert!(e.contains("absent.jsonl"), "{e}");
    assert!(Dataset::from_examples(vec![]).is_err());
}

#[test]
fn builtin_arithmetic_is_fixed_correct_and_mostly_one_digit() {
    let d = Dataset::load(&settings(DataSource::Builtin(BuiltinData::Arithmetic), "prompt")).unwrap();
    assert_eq!(d.len(), arithmetic::SIZE);
    let again = arithmetic::dataset();
    assert_eq!(d.examples(), again.examples(), "generated from a fixed seed");
    let mut one_digit = 0;
    for (i, e) in d.examples().iter().enumerate() {
        assert_eq!(e.index, i);
        let Prompt::Text(t) = &e.prompt else { panic!("text prompts") };
        let body = t.strip_prefix("What is ").and_then(|t| t.strip_suffix('?')).unwrap();
        let parts: Vec<&str> = body.split(' ').collect();
        let (a, b): (i64, i64) = (parts[0].parse().unwrap(), parts[2].parse().unwrap());
        let want = match parts[1] {
            "+" => a + b,
            "-" => a - b,
            "×" => a * b,
            op => panic!("operator {op}"),
        };
        assert!(want >= 0, "{t}");
        assert_eq!(e.columns["answer"], want.to_string(), "{t}");
        one_digit += (want < 10) as usize;
    }
    assert!(one_digit >= d.len() * 3 / 4, "{one_digit} one-digit answers");
    assert!(d.examples().iter().any(|e| matches!(&e.prompt, Prompt::Text(t) if t.contains('×'))));
}

#[test]
fn sampler_visits_every_example_once_per_epoch() {
    for len in [1, 2, 7, 64] {
        let mut s = Sampler::new(3, len, true);
        for epoch in 0..4 {
            assert_eq!(s.state(), SamplerState { epoch, cursor: 0 });
            let mut got = s.next_batch(len);
            got.sort();
            assert_eq!(got, (0..len).collect::<Vec<_>>());
        }
    }
}

#[test]
fn sampler_orders_depend_on_seed_and_epoch_and_shuffle() {
    let o = |seed, epoch| epoch_order(seed, 50, true, epoch);
    assert_eq!(o(1, 0), o(1, 0));
    assert_ne!(o(1, 0), o(2, 0), "different seeds, different orders");
    assert_ne!(o(1, 0), o(1, 1), "different epochs, different orders");
    assert_ne!(o(1, 0), (0..50).collect::<Vec<_>>());
    let mut s = Sampler::new(1, 5, false);
    assert_eq!(s.next_batch(12), vec![0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1], "no shuffle: file order, every epoch");
}

#[test]
fn batches_cross_epoch_boundaries() {
    let (seed, len) = (9, 10);
    let e0 = epoch_order(seed, len, true, 0);
    let e1 = epoch_order(seed, len, true, 1);
    let e2 = epoch_order(seed, len, true, 2);
    let mut s = Sampler::new(seed, len, true);
    assert_eq!(s.next_batch(7), e0[..7]);
    let b = s.next_batch(7);
    assert_eq!(b[..3], e0[7..]);
    assert_eq!(b[3..], e1[..4]);
    assert_eq!(s.state(), SamplerState { epoch: 1, cursor: 4 });
    let b = s.next_batch(25); // spans three epochs
    assert_eq!(b, [&e1[4..], &e2[..], &epoch_order(seed, len, true, 3)[..9]].concat());
    assert_eq!(s.state(), SamplerState { epoch: 3, cursor: 9 });
    assert_eq!(s.next_batch(0), Vec::<usize>::new());
}

/// Draw `steps` batches of `n`, interrupting (state → JSON → from_state) after `cut` of them.
fn run(seed: u64, len: usize, n: usize, steps: usize, cut: Option<usize>) -> (Vec<Vec<usize>>, Vec<SamplerState>) {
    let mut s = Sampler::new(seed, len, true);
    let (mut batches, mut states) = (vec![], vec![]);
    for step in 0..steps {
        if cut == Some(step) {
            let json = serde_json::to_string(&s.state()).unwrap();
            let state: SamplerState = serde_json::from_str(&json).unwrap();
            s = Sampler::from_state(seed, len, true, state).unwrap();
        }
        batches.push(s.next_batch(n));
        states.push(s.state());
    }
    (batches, states)
}

#[test]
fn resume_gives_the_batches_of_an_uninterrupted_run() {
    for (len, n) in [(10, 3), (10, 5), (7, 7), (4, 9), (1, 2)] {
        let straight = run(5, len, n, 12, None);
        for cut in 0..12 {
            assert_eq!(run(5, len, n, 12, Some(cut)), straight, "len {len}, batch {n}, cut after {cut}");
        }
    }
}

#[test]
fn resume_exactly_on_an_epoch_boundary() {
    // 12 examples in batches of 4: the third batch ends epoch 0.
    let mut s = Sampler::new(11, 12, true);
    let first: Vec<usize> = (0..3).flat_map(|_| s.next_batch(4)).collect();
    assert_eq!(s.state(), SamplerState { epoch: 1, cursor: 0 });
    let want = s.next_batch(8);
    assert_eq!(want, epoch_order(11, 12, true, 1)[..8]);
    let mut sorted = first;
    sorted.sort();
    assert_eq!(sorted, (0..12).collect::<Vec<_>>());
    // Resumed from the boundary state, and from the equivalent (epoch 0, cursor = len) one.
    let mut r = Sampler::from_state(11, 12, true, SamplerState { epoch: 1, cursor: 0 }).unwrap();
    assert_eq!(r.next_batch(8), want);
    let mut r = Sampler::from_state(11, 12, true, SamplerState { epoch: 0, cursor: 12 }).unwrap();
    assert_eq!(r.state(), SamplerState { epoch: 1, cursor: 0 });
    assert_eq!(r.next_batch(8), want);
    assert!(Sampler::from_state(11, 12, true, SamplerState { epoch: 0, cursor: 13 }).is_err());
    assert_eq!(serde_json::to_value(SamplerState { epoch: 2, cursor: 5 }).unwrap()["cursor"], 5);
}

#[test]
fn render_text_and_messages() {
    let tok = tokenizer();
    let ex = |prompt| Example { index: 0, prompt, columns: Default::default() };
    let text = ex(Prompt::Text("What is 1 + 2?".into()));
    assert_eq!(render(&text, &tok, false).unwrap(), "What is 1 + 2?");
    assert_eq!(
        render(&text, &tok, true).unwrap(),
        "<|im_start|>user\nWhat is 1 + 2?<|im_end|>\n<|im_start|>assistant\n"
    );
    let msgs = ex(Prompt::Messages(vec![ChatMessage::new("system", "s"), ChatMessage::new("user", "u")]));
    let want = "<|im_start|>system\ns<|im_end|>\n<|im_start|>user\nu<|im_end|>\n<|im_start|>assistant\n";
    assert_eq!(render(&msgs, &tok, false).unwrap(), want, "messages always use the template");
    assert_eq!(render(&msgs, &tok, true).unwrap(), want);
}

#[test]
fn prompts_are_truncated_on_the_left_and_counted() {
    let tok = tokenizer();
    let (ids, cut) = encode_prompt("abcdef", &tok, 6).unwrap();
    assert_eq!((ids, cut), (b"abcdef".iter().map(|&b| b as u32).collect(), false));
    let (ids, cut) = encode_prompt("abcdef", &tok, 4).unwrap();
    assert!(cut);
    assert_eq!(tok.decode(&ids, false).unwrap(), "cdef", "the end of the prompt is kept");
    // A chat prompt keeps its generation prompt; the template's leading <|im_start|> is text and may go.
    let chat = tok.apply_chat_template(&[ChatMessage::new("user", "x".repeat(40))], true).unwrap();
    let (ids, cut) = encode_prompt(&chat, &tok, 16).unwrap();
    assert!(cut && ids.len() == 16);
    assert!(tok.decode(&ids, false).unwrap().ends_with("xx<|im_end|>\n<|im_start|>assistant\n"));

    let mut counter = TruncationCounter::default();
    assert_eq!(counter.warning(4), None);
    let d = Dataset::from_examples(
        ["ab", "abcdefgh", "abcde"]
            .iter()
            .map(|t| Example { index: 9, prompt: Prompt::Text(t.to_string()), columns: Default::default() })
            .collect(),
    )
    .unwrap();
    assert_eq!(d.get(2).unwrap().index, 2, "from_examples renumbers");
    let lens: Vec<usize> = d.examples().iter().map(|e| counter.encode(e, &tok, false, 4).unwrap().len()).collect();
    assert_eq!(lens, [2, 4, 4]);
    assert_eq!(counter, TruncationCounter { seen: 3, truncated: 2 });
    let w = counter.warning(4).unwrap();
    assert!(w.contains("2 of 3") && w.contains("data.max_prompt_tokens = 4"), "{w}");
}

#[test]
fn a_bos_the_tokenizer_adds_stays_in_front() {
    use tokenizers::processors::template::TemplateProcessing;
    let cfg = safe::model::builtin::config("tiny").unwrap();
    let mut inner = safe::model::builtin::byte_tokenizer().unwrap();
    let bos = cfg.bos_token_id.unwrap();
    let post = TemplateProcessing::builder()
        .try_single("<|im_start|> $A")
        .unwrap()
        .special_tokens(vec![("<|im_start|>", bos)])
        .build()
        .unwrap();
    inner.with_post_processor(Some(post));
    let tok = safe::model::Tokenizer::from_parts(inner, Some("<|im_start|>"), None, None, None, &cfg, "t").unwrap();
    assert_eq!(tok.encode("ab").unwrap(), [bos, b'a' as u32, b'b' as u32]);
    let (ids, cut) = encode_prompt("abcdef", &tok, 3).unwrap();
    assert!(cut);
    assert_eq!(ids, [bos, b'e' as u32, b'f' as u32]);
    let (ids, _) = encode_prompt("abcdef", &tok, 1).unwrap();
    assert_eq!(ids, [b'f' as u32], "no room for the BOS: the end wins");
}
