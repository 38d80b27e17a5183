//! Recipe loading: defaults, error messages (file, line, key, suggestion), `--set`, resolved TOML, docs.

use safe::algo::grpo::GrpoSettings;
use safe::algo::{AlgorithmKind, Settings};
use safe::recipe::{self, schema, DataSource, LossType, Recipe, RewardSource, Rule, ScaleRewards};

const MINIMAL: &str = r#"
[model]
id = "org/model"

[data]
source = "builtin:arithmetic"

[[reward]]
name = "correct"
rule = "exact_answer"
"#;

fn load(text: &str, sets: &[&str]) -> Result<Recipe, String> {
    let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    recipe::from_str(text, "recipe.toml", &sets).map_err(|e| e.to_string())
}

/// The GRPO settings of a `kind = "grpo"` recipe.
fn grpo(r: &Recipe) -> &GrpoSettings {
    match &r.algorithm.settings {
        Settings::Grpo(g) => g,
        other => panic!("not a grpo recipe: {other:?}"),
    }
}

fn err(text: &str, sets: &[&str]) -> String {
    match load(text, sets) {
        Ok(_) => panic!("expected an error for:\n{text}\nsets {sets:?}"),
        Err(e) => e,
    }
}

#[test]
fn every_schema_default_is_valid_and_defaults_resolve() {
    let r = load(MINIMAL, &[]).unwrap();
    assert_eq!(r.run.name, "run");
    assert_eq!(r.run.output_dir, std::path::PathBuf::from("runs"));
    assert_eq!((r.run.seed, r.run.max_steps, r.run.log_every, r.run.save_every), (0, 100, 1, 50));
    assert_eq!((r.run.keep_last, r.run.completions_every, r.run.max_bad_steps), (3, 10, 3));
    assert_eq!(r.model.revision, "main");
    assert_eq!(r.data.source, DataSource::Builtin(recipe::BuiltinData::Arithmetic));
    assert_eq!(
        (r.data.prompt_field.as_str(), r.data.shuffle, r.data.max_prompt_tokens, r.data.chat),
        ("prompt", true, 256, true)
    );
    let ro = &r.rollout;
    assert_eq!((ro.prompts_per_step, ro.num_generations, ro.max_new_tokens), (8, 8, 64));
    assert_eq!((ro.temperature, ro.top_p, ro.top_k, ro.min_p, ro.repetition_penalty), (1.0, 1.0, 0, 0.0, 1.0));
    assert!(ro.stop.is_empty());
    assert_eq!(ro.batch_size, 0);
    assert_eq!(ro.completions_per_step(), 64);
    // TRL GRPOConfig defaults.
    let a = grpo(&r);
    assert_eq!((a.beta, a.clip.eps_low, a.clip.eps_high, a.num_iterations), (0.0, 0.2, 0.2, 1));
    assert_eq!(
        (a.loss_type, a.scale_rewards, a.mask_truncated_completions),
        (LossType::Dapo, ScaleRewards::Group, false)
    );
    assert_eq!((r.optim.lr, r.optim.betas, r.optim.eps, r.optim.weight_decay), (1e-6, [0.9, 0.999], 1e-8, 0.0));
    assert_eq!(r.optim.max_grad_norm, 1.0);
    assert_eq!(r.rewards.len(), 1);
    assert_eq!(r.rewards[0].source, RewardSource::Rule(Rule::ExactAnswer { field: "answer".into() }));
    // Every literal default fits its own kind; `SameAs` refers to a key earlier in the same table and `when` to one
    // earlier in the same table or in an earlier table (validation resolves tables and keys in schema order).
    for (i, k) in schema::KEYS.iter().enumerate() {
        assert!(!k.doc.is_empty(), "{} has no doc", k.path);
        if let schema::Default::Value(lit) = k.default {
            assert!(k.default_value().is_some(), "{}: default {lit} does not fit {}", k.path, k.kind.describe());
        }
        if let schema::Default::ByAlgorithm { overrides, .. } = k.default {
            assert!(k.default_value().is_some(), "{}: its default does not fit {}", k.path, k.kind.describe());
            for (algorithm, _) in overrides {
                assert!(AlgorithmKind::from_name(algorithm).is_some(), "{}: no algorithm {algorithm}", k.path);
                assert!(k.default_for(algorithm).is_some(), "{}: {algorithm}'s default does not fit", k.path);
            }
            let kind = schema::KEYS[..i].iter().position(|e| e.path == "algorithm.kind");
            assert!(
                kind.is_some() && k.table() == "algorithm",
                "{}: a per-algorithm default needs algorithm.kind first",
                k.path
            );
        }
        let earlier = |p: &str| schema::KEYS[..i].iter().any(|e| e.path == p && e.table() == k.table());
        if let schema::Default::SameAs(p) = k.default {
            assert!(earlier(p), "{}: SameAs {p} must come earlier", k.path);
        }
        if let Some(w) = k.when {
            let table_index = |t: &str| schema::TABLES.iter().position(|s| s.name == t).unwrap();
            let w_table = w.key.split_once('.').unwrap().0;
            let earlier_table = table_index(w_table) < table_index(k.table()) && schema::spec(w.key).is_some();
            assert!(earlier(w.key) || earlier_table, "{}: when {} must come earlier", k.path, w.key);
        }
    }
    for k in recipe::RESUMABLE_KEYS {
        assert!(schema::spec(k).is_some(), "{k}");
    }
}

#[test]
fn epsilon_high_follows_epsilon_unless_set() {
    let r = load(MINIMAL, &["algorithm.epsilon=0.1"]).unwrap();
    assert_eq!(grpo(&r).clip.eps_high, 0.1);
    let r = load(MINIMAL, &["algorithm.epsilon_high=0.28"]).unwrap();
    assert_eq!((grpo(&r).clip.eps_low, grpo(&r).clip.eps_high), (0.2, 0.28));
    let e = err(MINIMAL, &["algorithm.epsilon_high=0.1"]);
    assert!(e.contains("algorithm.epsilon_high") && e.contains("algorithm.epsilon"), "{e}");
}

#[test]
fn unknown_key_names_file_line_and_suggestion() {
    let text = format!("{MINIMAL}\n[rollout]\nmax_new_token = 32\n");
    let line = text.lines().position(|l| l.starts_with("max_new_token")).unwrap() + 1;
    let e = err(&text, &[]);
    assert!(
        e.contains(&format!("recipe.toml:{line}: unknown key `rollout.max_new_token`; did you mean `max_new_tokens`?")),
        "{e}"
    );
    // A key in the wrong table points to the right one.
    let e = err(&format!("{MINIMAL}\n[rollout]\nlr = 1e-5\n"), &[]);
    assert!(e.contains("`optim.lr`"), "{e}");
    let e = err(&format!("{MINIMAL}\n[rolout]\n"), &[]);
    assert!(e.contains("unknown table `rolout`; did you mean `rollout`?"), "{e}");
}

#[test]
fn wrong_type_and_out_of_range_name_key_and_line() {
    let text = format!("{MINIMAL}\n[rollout]\nmax_new_tokens = \"64\"\ntemperature = 0\n");
    let l1 = text.lines().position(|l| l.starts_with("max_new_tokens")).unwrap() + 1;
    let e = err(&text, &[]);
    assert!(e.contains(&format!("recipe.toml:{l1}: `rollout.max_new_tokens` must be an integer, got a string")), "{e}");
    // All problems are reported at once.
    assert!(
        e.contains(&format!("recipe.toml:{}: `rollout.temperature` = 0 is out of range: must be number > 0", l1 + 1)),
        "{e}"
    );
    let e = err(&format!("{MINIMAL}\n[rollout]\ntop_p = 1.5\n"), &[]);
    assert!(e.contains("`rollout.top_p` = 1.5 is out of range: must be number in (0, 1]"), "{e}");
    let e = err(&format!("{MINIMAL}\n[algorithm]\nloss_type = \"ppo\"\n"), &[]);
    assert!(e.contains("`algorithm.loss_type` = \"ppo\" is not valid: must be one of \"dapo\""), "{e}");
}

#[test]
fn parse_errors_and_missing_required_keys() {
    let e = err("[model\nid = 1\n", &[]);
    assert!(e.starts_with("recipe.toml:1: invalid TOML") && e.contains("line 1, column"), "{e}");
    let e = err(
        "[data]\nsource = \"builtin:arithmetic\"\n[[reward]]\nname = \"a\"\nrule = \"contains\"\ntext = \"x\"\n",
        &[],
    );
    assert!(e.contains("recipe.toml: [model] is missing required key `model.id`"), "{e}");
    let e = err(&MINIMAL.replace("source = \"builtin:arithmetic\"", "source = \"builtin:nope\""), &[]);
    assert!(e.contains("`data.source` = \"builtin:nope\" is not valid") && e.contains("builtin:arithmetic"), "{e}");
}

#[test]
fn set_overrides_are_typed_by_the_schema() {
    let r = load(
        MINIMAL,
        &[
            "model.id=/x/y",
            "rollout.max_new_tokens=128",
            "rollout.stop=[\"\\n\\n\", \"END\"]",
            "optim.betas=[0.8, 0.95]",
            "data.shuffle=false",
            "algorithm.loss_type=grpo",
            "reward[0].weight=2",
            "reward.1.name=fmt",
            "reward.1.rule=regex",
            "reward.1.pattern=^\\d+$",
        ],
    )
    .unwrap();
    assert_eq!(r.model.id, "/x/y");
    assert_eq!(r.rollout.max_new_tokens, 128);
    assert_eq!(r.rollout.stop, vec!["\n\n".to_string(), "END".to_string()]);
    assert_eq!(r.optim.betas, [0.8, 0.95]);
    assert!(!r.data.shuffle);
    assert_eq!(grpo(&r).loss_type, LossType::Grpo);
    assert_eq!(r.rewards[0].weight, 2.0);
    assert_eq!(r.rewards[1].source, RewardSource::Rule(Rule::Regex { pattern: "^\\d+$".into() }));

    let e = err(MINIMAL, &["rollout.max_new_tokens=abc"]);
    assert!(e.contains("--set `rollout.max_new_tokens=abc`") && e.contains("must be an integer"), "{e}");
    let e = err(MINIMAL, &["rollout.max_new_token=3"]);
    assert!(e.contains("--set `rollout.max_new_token=3`: unknown key") && e.contains("max_new_tokens"), "{e}");
    let e = err(MINIMAL, &["reward.5.weight=1"]);
    assert!(e.contains("--set `reward.5.weight=1`"), "{e}");
}

#[test]
fn overrides_apply_before_cross_key_checks() {
    let text = format!("{MINIMAL}\n[algorithm]\nmicro_batch_size = 5\n");
    let e = err(&text, &[]);
    for key in ["rollout.prompts_per_step", "rollout.num_generations", "algorithm.micro_batch_size", "8 × 8 = 64"] {
        assert!(e.contains(key), "missing {key} in {e}");
    }
    assert!(load(&text, &["algorithm.micro_batch_size=16"]).is_ok());
    assert!(load(&text, &["rollout.num_generations=5"]).is_ok()); // 8 × 5 = 40, divisible by 5
    let e = err(MINIMAL, &["rollout.num_generations=1"]);
    assert!(e.contains("rollout.num_generations") && e.contains("2 or more"), "{e}");
}

#[test]
fn reward_rules_and_their_parameters() {
    let base = "[model]\nid = \"m/x\"\n[data]\nsource = \"d.jsonl\"\n";
    let e = err(&format!("{base}[[reward]]\nname = \"a\"\nrule = \"fuzzy\"\n"), &[]);
    assert!(e.contains("recipe.toml:7: `reward.rule` = \"fuzzy\" is not valid: must be one of"), "{e}");
    let e = err(&format!("{base}[[reward]]\nname = \"a\"\nrule = \"regex\"\n"), &[]);
    assert!(e.contains("recipe.toml:5: [[reward]] #1 is missing required key `reward.pattern`"), "{e}");
    let e = err(&format!("{base}[[reward]]\nname = \"a\"\nrule = \"exact_answer\"\npattern = \"x\"\n"), &[]);
    assert!(e.contains("recipe.toml:8: `reward.pattern` only applies when `reward.rule` is \"regex\""), "{e}");
    let e = err(&format!("{base}[[reward]]\nname = \"a\"\nrule = \"regex\"\npattern = \"(\"\n"), &[]);
    assert!(e.contains("`reward.pattern` = \"(\" is not valid: must be a valid regular expression"), "{e}");
    let e = err(&format!("{base}[[reward]]\nname = \"a\"\nrule = \"length\"\ntarget = 5\n[[reward]]\nname = \"a\"\nrule = \"contains\"\ntext = \"x\"\n"), &[]);
    assert!(e.contains("recipe.toml:10: `reward.name` = \"a\" is already used (at recipe.toml:6)"), "{e}");
    let e = err(base, &[]);
    assert!(e.contains("no [[reward]] table"), "{e}");
    let r = load(&format!("{base}[[reward]]\nname = \"a\"\nrule = \"contains\"\ntext = \"ok\"\nweight = -1\n"), &[])
        .unwrap();
    assert_eq!(r.rewards[0].source, RewardSource::Rule(Rule::Contains { text: "ok".into() }));
    assert_eq!(r.data.source, DataSource::Jsonl("d.jsonl".into()));
}

#[test]
fn rollout_file_is_required_only_for_replay() {
    let e = err(MINIMAL, &["rollout.source=file"]);
    assert!(e.contains("missing required key `rollout.file`"), "{e}");
    let r = load(MINIMAL, &["rollout.source=file", "rollout.file=r.jsonl"]).unwrap();
    assert_eq!(r.rollout.source, recipe::RolloutSource::File("r.jsonl".into()));
    let e = err(MINIMAL, &["rollout.file=r.jsonl"]);
    assert!(e.contains("`rollout.file` only applies when `rollout.source` is \"file\""), "{e}");
}

#[test]
fn resolved_toml_round_trips_and_hash_is_stable() {
    let sets = [
        "rollout.stop=[\"a\\\"b\", \"\\n\"]",
        "optim.lr=3e-7",
        "reward.1.name=len",
        "reward.1.rule=length",
        "reward.1.target=20",
    ];
    let r = load(MINIMAL, &sets).unwrap();
    let text = r.to_toml_string();
    let back = load(&text, &[]).unwrap_or_else(|e| panic!("{e}\n{text}"));
    assert_eq!(back, r);
    assert_eq!(back.to_toml_string(), text);
    assert_eq!(back.hash(), r.hash());
    assert!(text.contains("max_new_tokens = 64") && text.contains("epsilon_high = 0.2"), "{text}");

    // Keys that may change on resume change the hash but not the resume hash.
    let longer = load(MINIMAL, &["run.max_steps=500", "run.save_every=7"]).unwrap();
    let base = load(MINIMAL, &[]).unwrap();
    assert_ne!(longer.hash(), base.hash());
    assert_eq!(longer.resume_hash(), base.resume_hash());
    assert!(base.resume_conflicts(&longer).is_empty());
    assert_eq!(base.changed_keys(&longer), vec!["run.max_steps", "run.save_every"]);
    let other = load(MINIMAL, &["optim.lr=1e-5"]).unwrap();
    assert_eq!(base.resume_conflicts(&other), vec!["optim.lr"]);
    assert_ne!(other.resume_hash(), base.resume_hash());
}

#[test]
fn example_recipe_is_valid() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/example.toml");
    let r = recipe::load(&path, &[]).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.rollout.completions_per_step() % r.algorithm.micro_batch_size, 0);
}

#[test]
fn docs_recipe_md_is_in_sync() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/recipe.md");
    let want = recipe::explain(true);
    if std::env::var_os("UPDATE_DOCS").is_some() {
        std::fs::write(&path, &want).unwrap();
    }
    let have = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        have == want,
        "docs/recipe.md is out of date; regenerate with `cargo run -- check --explain --markdown > docs/recipe.md` \
         or `UPDATE_DOCS=1 cargo test --test recipe docs_recipe_md_is_in_sync`"
    );
    for k in schema::KEYS {
        assert!(want.contains(&format!("`{}`", k.path)), "{} missing from the docs", k.path);
    }
}

const GATED: &str = r#"
[model]
id = "org/model"

[data]
source = "builtin:arithmetic"

[[reward]]
name = "correct"
rule = "exact_answer"

[[reward]]
name = "format"
rule = "regex"
pattern = "^[0-9]+$"
weight = 0.5
gate = { on = "correct", min = 1.0 }
"#;

#[test]
fn gates_parse_inline_dotted_and_set_and_resolve_back() {
    let r = load(GATED, &[]).unwrap();
    let g = r.rewards[1].gate.as_ref().unwrap();
    assert_eq!((g.on.as_str(), g.min), ("correct", 1.0));
    assert!(r.rewards[0].gate.is_none());
    // The resolved TOML writes dotted keys and loads back equal.
    let text = r.to_toml_string();
    assert!(text.contains("gate.on = \"correct\"\ngate.min = 1.0"), "{text}");
    assert_eq!(load(&text, &[]).unwrap(), r);
    // --set reaches nested keys.
    let r = load(GATED, &["reward.1.gate.min=0.5"]).unwrap();
    assert_eq!(r.rewards[1].gate.as_ref().unwrap().min, 0.5);
    let dotted = GATED.replace("gate = { on = \"correct\", min = 1.0 }", "gate.on = \"correct\"\ngate.min = 2");
    assert_eq!(load(&dotted, &[]).unwrap().rewards[1].gate.as_ref().unwrap().min, 2.0);
}

#[test]
fn bad_gates_name_the_line_and_the_problem() {
    let e = err(GATED, &["reward.1.gate.on=corect"]);
    assert!(e.contains("gated on `corect`") && e.contains("did you mean `correct`?"), "{e}");
    let e = err(&GATED.replace("gate = { on = \"correct\", min = 1.0 }", "gate = { on = \"correct\" }"), &[]);
    assert!(e.starts_with("recipe.toml:17:") && e.contains("needs both `on` and `min`"), "{e}");
    let e = err(GATED, &["reward.1.gate.on=format"]);
    assert!(e.contains("`format` is gated on itself"), "{e}");
    let e = err(GATED, &["reward.0.gate.on=format", "reward.0.gate.min=1"]);
    assert!(e.contains("cycle"), "{e}");
    let e = err(&GATED.replace("min = 1.0", "minimum = 1.0"), &[]);
    assert!(e.contains("unknown key `reward.gate.minimum`"), "{e}");
}

#[test]
fn reward_source_kinds_and_their_keys() {
    let text = MINIMAL.replace(
        "rule = \"exact_answer\"",
        "rule = \"exact_answer\"\n\n[[reward]]\nname = \"rm\"\nkind = \"model\"\nmodel = \"org/rm\"\nchat = true\n\n\
         [[reward]]\nname = \"cmd\"\nkind = \"command\"\ncommand = [\"python3\", \"score.py\"]\ntimeout = 5\n\n\
         [[reward]]\nname = \"srv\"\nkind = \"http\"\nurls = [\"http://127.0.0.1:8000/score\"]\nmax_retries = 4",
    );
    let r = load(&text, &[]).unwrap();
    assert_eq!(r.rewards[1].source, RewardSource::Model { id: "org/rm".into(), chat: true, batch_size: 16 });
    assert_eq!(
        r.rewards[2].source,
        RewardSource::Command { argv: vec!["python3".into(), "score.py".into()], timeout: 5.0, max_retries: 2 }
    );
    assert_eq!(
        r.rewards[3].source,
        RewardSource::Http {
            urls: vec!["http://127.0.0.1:8000/score".into()],
            label_field: "answer".into(),
            timeout: 60.0,
            max_retries: 4
        }
    );
    assert_eq!(load(&r.to_toml_string(), &[]).unwrap(), r);
    // Keys of another kind are errors naming the kind; a kind's required key is required.
    let e = err(&MINIMAL.replace("rule = \"exact_answer\"", "rule = \"exact_answer\"\nurls = [\"http://x\"]"), &[]);
    assert!(e.contains("`reward.urls` only applies when `reward.kind` is \"http\""), "{e}");
    let e = err(&MINIMAL.replace("rule = \"exact_answer\"", "kind = \"command\""), &[]);
    assert!(e.contains("missing required key `reward.command`"), "{e}");
}

/// Every default is stated once in the schema; the Rust `Default` of each algorithm's settings must agree with it,
/// key for key (a recipe that sets only `algorithm.kind` builds exactly the default settings).
#[test]
fn every_algorithms_rust_defaults_equal_the_schema_defaults() {
    for name in AlgorithmKind::NAMES {
        let kind = AlgorithmKind::from_name(name).unwrap();
        let r = load(MINIMAL, &[&format!("algorithm.kind={name}")]).unwrap();
        assert_eq!(r.algorithm.kind, kind);
        assert_eq!(r.algorithm.settings, Settings::default_of(kind), "{name}: Rust defaults differ from the schema's");
    }
}

/// A key the chosen algorithm does not read is an error naming the key and the algorithms that read it.
#[test]
fn keys_of_other_algorithms_are_refused_naming_who_reads_them() {
    for (key, value, readers) in [
        ("algorithm.num_iterations", "2", "\"grpo\" or \"grpo_lambda\""),
        ("algorithm.loss_type", "grpo", "\"grpo\" or \"grpo_lambda\""),
        ("algorithm.scale_rewards", "none", "\"grpo\" or \"grpo_lambda\""),
        ("algorithm.mask_truncated_completions", "true", "\"grpo\" or \"grpo_lambda\""),
        ("algorithm.use_bias_correction_kl", "false", "\"grpo\" or \"grpo_lambda\""),
    ] {
        let e = err(MINIMAL, &["algorithm.kind=ppo", &format!("{key}={value}")]);
        assert!(e.contains(&format!("`{key}` only applies when `algorithm.kind` is {readers}")), "{e}");
        assert!(e.contains("`algorithm.kind` = \"ppo\""), "{e}");
    }
    // SAFE reads no β (its controller sets the KL penalty) and no PPO critic keys.
    let e = err(MINIMAL, &["algorithm.kind=safe", "algorithm.beta=0.1"]);
    assert!(e.contains("`algorithm.beta` only applies when `algorithm.kind` is"), "{e}");
    let e = err(MINIMAL, &["algorithm.kind=safe", "critic.init=reward_model"]);
    assert!(e.contains("`critic.init` only applies when `algorithm.kind` is \"ppo\""), "{e}");
    // [critic] under GRPO, from a file: the line of the key.
    let text = format!("{MINIMAL}\n[critic]\nlr = 1e-4\n");
    let e = err(&text, &[]);
    assert!(e.contains("recipe.toml:13: `critic.lr` only applies when `algorithm.kind` is \"ppo\" or \"safe\""), "{e}");
    // Keys every algorithm reads stay accepted.
    for name in AlgorithmKind::NAMES {
        load(MINIMAL, &[&format!("algorithm.kind={name}"), "algorithm.epsilon=0.1", "algorithm.micro_batch_size=8"])
            .unwrap();
    }
}

/// An algorithm's problem with a `[[reward]]` names that reward's own line (GRPO-λ refuses rewards besides its
/// correctness reward), even when the correctness reward comes after it.
#[test]
fn an_algorithms_reward_problem_names_the_rewards_line() {
    let text = "[model]\nid = \"org/model\"\n\n[data]\nsource = \"builtin:arithmetic\"\n\n[algorithm]\n\
                kind = \"grpo_lambda\"\n\n[[reward]]\nname = \"short\"\nrule = \"length\"\ntarget = 3\n\n\
                [[reward]]\nname = \"correct\"\nrule = \"exact_answer\"\n";
    let line = text.lines().position(|l| l == "name = \"short\"").unwrap() + 1;
    let e = err(text, &[]);
    assert!(e.contains(&format!("recipe.toml:{line}: reward `short`: algorithm.kind = \"grpo_lambda\"")), "{e}");
}

#[test]
fn report_to_lists_outputs_and_names_a_bad_one_with_its_line() {
    use safe::recipe::ReportTo;
    let r = load(MINIMAL, &[]).unwrap();
    assert_eq!(r.run.report_to, vec![ReportTo::Jsonl]);
    assert!(!r.run.tensorboard());
    let r = load(&format!("[run]\nreport_to = [\"tensorboard\"]\n{MINIMAL}"), &[]).unwrap();
    assert_eq!(r.run.report_to, vec![ReportTo::Tensorboard]);
    assert!(r.run.tensorboard());
    assert!(r.to_toml_string().contains("report_to = [\"tensorboard\"]"));
    let r = load(MINIMAL, &["run.report_to=[\"jsonl\", \"tensorboard\"]"]).unwrap();
    assert!(r.run.tensorboard());
    // It may change on resume.
    assert!(load(MINIMAL, &[]).unwrap().resume_conflicts(&r).is_empty());

    let e = err(&format!("[run]\nname = \"x\"\nreport_to = [\"jsonl\", \"wandb\"]\n{MINIMAL}"), &[]);
    assert!(
        e.contains(
            "recipe.toml:3: `run.report_to` = [\"jsonl\", \"wandb\"] is not valid: must be a list of \"jsonl\" | \
             \"tensorboard\" (\"wandb\" is not one)"
        ),
        "{e}"
    );
    // On a command line, bare names separated by commas do (a regression: `--set run.report_to=tensorboard` was
    // refused as "not a TOML value").
    let r = load(MINIMAL, &["run.report_to=tensorboard"]).unwrap();
    assert_eq!(r.run.report_to, vec![ReportTo::Tensorboard]);
    let r = load(MINIMAL, &["run.report_to=jsonl,tensorboard"]).unwrap();
    assert_eq!(r.run.report_to, vec![ReportTo::Jsonl, ReportTo::Tensorboard]);
    let e = err(MINIMAL, &["run.report_to=tb"]);
    assert!(e.contains("\"tb\" is not one"), "{e}");
    let e = err(MINIMAL, &["run.report_to=[\"tb\"]"]);
    assert!(e.contains("--set `run.report_to=[\"tb\"]`: `run.report_to`") && e.contains("\"tb\" is not one"), "{e}");
    let e = err(&format!("[run]\nreport_to = \"tensorboard\"\n{MINIMAL}"), &[]);
    assert!(
        e.contains("recipe.toml:2: `run.report_to` must be a list of strings, each one of \"jsonl\" | \"tensorboard\""),
        "{e}"
    );
}
