//! Raw TOML (+ `--set`) → typed, checked [`Recipe`]. The only place raw recipe input is looked at.
//!
//! Stages: parse with spans → type every key against the schema (collecting all problems, not just the first) →
//! apply `--set` overrides → fill defaults and check which keys apply → build typed settings → cross-key checks.

use std::collections::BTreeMap;
use std::path::PathBuf;

use super::schema::{self, Default, KeySpec, Kind, Mismatch, Value};
use super::LrSchedule;
use super::{
    AlgorithmKind, BuiltinData, DTypeSpec, LoraBaseDtype, LoraInit, ReportTo, RewardKind, RolloutSourceKind,
    RolloutWeights, RuleKind, ShapingKind,
};
use super::{
    AlgorithmSettings, DataSettings, DataSource, DeviceSpec, EvalData, EvalSettings, GateSettings, LoraSettings,
    ModelSettings, OptimSettings, Recipe, RecipeError, Resolved, RewardSettings, RewardSource, RolloutSettings,
    RolloutSource, Rule, RunSettings,
};

/// Where a value came from, for messages.
#[derive(Debug, Clone, PartialEq)]
enum Origin {
    /// A line of the recipe file (1-based).
    Line(usize),
    /// A `--set` argument, verbatim.
    Set(String),
    /// A schema default (or the file as a whole).
    Default,
}

#[derive(Debug, Clone)]
struct Entry {
    value: Value,
    origin: Origin,
}

/// One table's keys as given (before defaults), plus where the table itself starts.
#[derive(Default)]
struct Given {
    header: Option<usize>,
    keys: BTreeMap<&'static str, Entry>,
}

#[derive(Default)]
struct Raw {
    tables: BTreeMap<&'static str, Given>,
    rewards: Vec<Given>,
}

/// A table after defaults: values in schema order.
struct Filled {
    header: Origin,
    keys: Vec<(&'static str, Entry)>,
}

impl Filled {
    fn get(&self, path: &str) -> Option<&Entry> {
        self.keys.iter().find(|(p, _)| *p == path).map(|(_, e)| e)
    }
}

struct Ctx<'a> {
    origin: &'a str,
    text: &'a str,
    problems: Vec<String>,
}

impl Ctx<'_> {
    fn line_of(&self, offset: usize) -> usize {
        self.text[..offset.min(self.text.len())].bytes().filter(|b| *b == b'\n').count() + 1
    }
    fn loc(&self, origin: &Origin) -> String {
        match origin {
            Origin::Line(l) => format!("{}:{l}", self.origin),
            Origin::Set(arg) => format!("--set `{arg}`"),
            Origin::Default => self.origin.to_string(),
        }
    }
    fn err(&mut self, origin: &Origin, msg: impl AsRef<str>) {
        self.problems.push(format!("{}: {}", self.loc(origin), msg.as_ref()));
    }
}

pub(super) fn from_str(text: &str, origin: &str, sets: &[String]) -> Result<Recipe, RecipeError> {
    let mut ctx = Ctx { origin, text, problems: Vec::new() };
    let mut raw = parse(&mut ctx);
    for arg in sets {
        apply_set(arg, &mut raw, &mut ctx);
    }
    // Typing problems make later messages unreliable (a missing key may just be a misspelt one): stop here.
    if !ctx.problems.is_empty() {
        return Err(RecipeError { problems: ctx.problems });
    }
    let (tables, rewards) = fill(&mut raw, &mut ctx);
    if !ctx.problems.is_empty() {
        return Err(RecipeError { problems: ctx.problems });
    }
    let recipe = build(&tables, &rewards, &mut ctx);
    match recipe {
        Some(r) if ctx.problems.is_empty() => Ok(r),
        _ => Err(RecipeError { problems: ctx.problems }),
    }
}

// ---------------------------------------------------------------- parsing and typing

fn parse(ctx: &mut Ctx) -> Raw {
    let mut raw = Raw::default();
    let doc = match toml_edit::ImDocument::parse(ctx.text) {
        Ok(doc) => doc,
        Err(e) => {
            let at = e.span().map(|s| ctx.loc(&Origin::Line(ctx.line_of(s.start)))).unwrap_or(ctx.origin.to_string());
            ctx.problems.push(format!("{at}: invalid TOML: {e}"));
            return raw;
        }
    };
    let root = doc.as_table();
    for (name, item) in root.iter() {
        let line = Origin::Line(
            root.key(name).and_then(|k| k.span()).or_else(|| item.span()).map(|s| ctx.line_of(s.start)).unwrap_or(1),
        );
        let Some(table) = schema::table(name) else {
            let msg = format!("unknown table `{name}`{}", suggest_table(name));
            ctx.err(&line, msg);
            continue;
        };
        let header = match &line {
            Origin::Line(l) => Some(*l),
            _ => None,
        };
        if !table.array {
            let Some(t) = item.as_table_like() else {
                ctx.err(&line, format!("`{name}` must be a table: write [{name}] and its keys on the lines below"));
                continue;
            };
            let given = raw.tables.entry(table.name).or_default();
            given.header = header;
            walk(ctx, table.name, t, &mut given.keys);
            continue;
        }
        // [[reward]] tables, or `reward = [{...}, ...]` inline.
        let entries: Vec<(&dyn toml_edit::TableLike, Option<usize>)> = if let Some(aot) = item.as_array_of_tables() {
            aot.iter().map(|t| (t as &dyn toml_edit::TableLike, t.span().map(|s| ctx.line_of(s.start)))).collect()
        } else if let Some(arr) = item.as_array().filter(|a| a.iter().all(|v| v.is_inline_table())) {
            arr.iter()
                .filter_map(|v| v.as_inline_table().map(|t| (t as &dyn toml_edit::TableLike, v.span())))
                .map(|(t, s)| (t, s.map(|s| ctx.line_of(s.start))))
                .collect()
        } else {
            ctx.err(
                &line,
                format!("`{name}` must be an array of tables: write [[{name}]] (double brackets) per entry"),
            );
            continue;
        };
        for (t, l) in entries {
            let mut given = Given { header: l.or(header), keys: BTreeMap::new() };
            walk(ctx, table.name, t, &mut given.keys);
            raw.rewards.push(given);
        }
    }
    raw
}

fn walk(ctx: &mut Ctx, table: &str, t: &dyn toml_edit::TableLike, out: &mut BTreeMap<&'static str, Entry>) {
    for (k, item) in t.iter() {
        let span = t.get_key_value(k).and_then(|(key, _)| key.span()).or_else(|| item.span());
        let origin = span.map(|s| Origin::Line(ctx.line_of(s.start))).unwrap_or(Origin::Default);
        let path = format!("{table}.{k}");
        // A sub-table (`gate = { on = .., min = .. }` or dotted `gate.on = ..`) holds keys `table.k.*`.
        if let Some(sub) = item.as_table_like() {
            if schema::KEYS.iter().any(|s| s.path.starts_with(&format!("{path}."))) {
                walk(ctx, &path, sub, out);
                continue;
            }
        }
        let Some(spec) = schema::spec(&path) else {
            let msg = format!("unknown key `{path}`{}", suggest_key(table, k));
            ctx.err(&origin, msg);
            continue;
        };
        let Some(v) = item.as_value() else {
            ctx.err(&origin, format!("`{path}` must be {}, not a table", expected(&spec.kind)));
            continue;
        };
        match to_value(v) {
            Ok(v) => {
                if let Some(v) = typed(ctx, spec, &v, &origin) {
                    out.insert(spec.path, Entry { value: v, origin });
                }
            }
            Err(what) => ctx.err(&origin, format!("`{path}` must be {}, got {what}", expected(&spec.kind))),
        }
    }
}

fn to_value(v: &toml_edit::Value) -> Result<Value, &'static str> {
    Value::from_toml(v)
}

fn expected(kind: &Kind) -> String {
    kind.expected()
}

/// Check a value against its key's kind, reporting the key, the value and what was expected.
fn typed(ctx: &mut Ctx, spec: &KeySpec, v: &Value, origin: &Origin) -> Option<Value> {
    match spec.kind.check(v) {
        Ok(v) => Some(v),
        Err(Mismatch::Type { expected }) => {
            ctx.err(origin, format!("`{}` must be {expected}, got {} `{}`", spec.path, v.type_name(), v.to_toml()));
            None
        }
        Err(Mismatch::Range { allowed }) => {
            // Numbers have ranges; strings have rules (a choice, a device, a regex that compiles...).
            let what = if matches!(v, Value::Str(_)) || matches!(spec.kind, Kind::ChoiceList(_)) {
                "is not valid"
            } else {
                "is out of range"
            };
            ctx.err(origin, format!("`{}` = {} {what}: must be {allowed}", spec.path, v.to_toml()));
            None
        }
    }
}

fn suggest_key(table: &str, k: &str) -> String {
    let elsewhere: Vec<String> = schema::KEYS
        .iter()
        .filter(|s| s.name() == k && s.table() != table)
        .map(|s| format!("[{}] (`{}`)", s.table(), s.path))
        .collect();
    if !elsewhere.is_empty() {
        return format!("; `{k}` belongs in {}", elsewhere.join(" or "));
    }
    let names: Vec<&str> = schema::keys_of(table).map(|s| s.name()).collect();
    match nearest(k, &names) {
        Some(n) => format!("; did you mean `{n}`?"),
        None => format!("; valid keys in [{table}]: {}", names.join(", ")),
    }
}

fn suggest_table(name: &str) -> String {
    if let Some(spec) = schema::KEYS.iter().find(|s| s.name() == name) {
        return format!("; `{name}` is a key of [{}] (`{}`)", spec.table(), spec.path);
    }
    let names: Vec<&str> = schema::TABLES.iter().map(|t| t.name).collect();
    match nearest(name, &names) {
        Some(n) => format!("; did you mean `{n}`?"),
        None => format!("; valid tables: {}", names.join(", ")),
    }
}

/// The closest name by edit distance, if close enough to be a plausible typo.
fn nearest<'a>(word: &str, names: &[&'a str]) -> Option<&'a str> {
    let (best, d) = names.iter().map(|n| (*n, strsim::damerau_levenshtein(word, n))).min_by_key(|(_, d)| *d)?;
    (d <= (word.len() / 3).max(2)).then_some(best)
}

// ---------------------------------------------------------------- --set

fn apply_set(arg: &str, raw: &mut Raw, ctx: &mut Ctx) {
    let origin = Origin::Set(arg.to_string());
    let Some((path, text)) = arg.split_once('=') else {
        ctx.err(&origin, "expected table.key=value, e.g. --set rollout.max_new_tokens=128");
        return;
    };
    // `reward[0].weight` and `reward.0.weight` both name the first [[reward]].
    let path = path.trim().replace('[', ".").replace(']', "");
    let parts: Vec<&str> = path.split('.').filter(|p| !p.is_empty()).collect();
    let Some(table) = parts.first().and_then(|t| schema::table(t)) else {
        let name = parts.first().copied().unwrap_or("");
        ctx.err(&origin, format!("unknown table `{name}`{}", suggest_table(name)));
        return;
    };
    // Keys may be nested (`reward.0.gate.on`).
    let (index, key) = match (table.array, parts.as_slice()) {
        (false, [_, rest @ ..]) if !rest.is_empty() => (None, rest.join(".")),
        (true, [_, index, rest @ ..]) if !rest.is_empty() => match index.parse::<usize>() {
            Ok(i) => (Some(i), rest.join(".")),
            Err(_) => {
                ctx.err(&origin, format!("expected {0}.<index>.<key>, e.g. {0}.0.weight=2", table.name));
                return;
            }
        },
        (false, _) => {
            ctx.err(&origin, format!("expected {}.<key>=value", table.name));
            return;
        }
        (true, _) => {
            ctx.err(&origin, format!("expected {0}.<index>.<key>=value, e.g. {0}.0.weight=2", table.name));
            return;
        }
    };
    let full = format!("{}.{key}", table.name);
    let Some(spec) = schema::spec(&full) else {
        ctx.err(&origin, format!("unknown key `{full}`{}", suggest_key(table.name, &key)));
        return;
    };
    // Strings need no quotes on a command line; everything else is a TOML value.
    let quoted = text.starts_with('"') || text.starts_with('\'');
    let list_of_names = matches!(spec.kind, Kind::ChoiceList(_)) && !text.starts_with('[');
    let value = if spec.kind.is_stringy() && !quoted {
        Value::Str(text.to_string())
    } else if list_of_names {
        // `--set run.report_to=jsonl,tensorboard`: names separated by commas, no brackets or quotes needed.
        Value::List(text.split(',').map(|n| Value::Str(n.trim().trim_matches(['"', '\'']).to_string())).collect())
    } else {
        match text.parse::<toml_edit::Value>().map_err(|_| "not a TOML value").and_then(|v| to_value(&v)) {
            Ok(v) => v,
            Err(why) => {
                ctx.err(&origin, format!("`{full}` must be {}; `{text}` is {why}", expected(&spec.kind)));
                return;
            }
        }
    };
    let Some(value) = typed(ctx, spec, &value, &origin) else { return };
    let given = match index {
        None => raw.tables.entry(table.name).or_default(),
        Some(i) if i < raw.rewards.len() => &mut raw.rewards[i],
        Some(i) if i == raw.rewards.len() => {
            raw.rewards.push(Given::default());
            &mut raw.rewards[i]
        }
        Some(i) => {
            let n = raw.rewards.len();
            ctx.err(
                &origin,
                format!("there are {n} [[{}]] tables; index {i} must be < {n} ({n} adds one)", table.name),
            );
            return;
        }
    };
    given.keys.insert(spec.path, Entry { value, origin });
}

// ---------------------------------------------------------------- defaults and applicability

fn fill(raw: &mut Raw, ctx: &mut Ctx) -> (BTreeMap<&'static str, Filled>, Vec<Filled>) {
    let mut tables = BTreeMap::new();
    for t in schema::TABLES.iter().filter(|t| !t.array) {
        let Some(given) = raw.tables.remove(t.name).or_else(|| (!t.optional).then(Given::default)) else {
            // An optional table that is absent resolves to nothing.
            tables.insert(t.name, Filled { header: Origin::Default, keys: Vec::new() });
            continue;
        };
        let filled = fill_one(t.name, given, "", &tables, ctx);
        tables.insert(t.name, filled);
    }
    let rewards = std::mem::take(&mut raw.rewards)
        .into_iter()
        .enumerate()
        .map(|(i, g)| fill_one("reward", g, &format!("[[reward]] #{} ", i + 1), &tables, ctx))
        .collect();
    (tables, rewards)
}

/// Fill one table's defaults; `earlier` are the tables filled before it (a `when` may name their keys).
fn fill_one(
    table: &str,
    mut given: Given,
    what: &str,
    earlier: &BTreeMap<&'static str, Filled>,
    ctx: &mut Ctx,
) -> Filled {
    let header = given.header.map(Origin::Line).unwrap_or(Origin::Default);
    let mut out = Filled { header: header.clone(), keys: Vec::new() };
    // Schema order puts every `when` / `SameAs` target before the keys that refer to it.
    for spec in schema::keys_of(table) {
        let entry = given.keys.remove(spec.path);
        if let Some(w) = spec.when {
            let other = w.key.split_once('.').and_then(|(t, _)| earlier.get(t));
            // (A missing condition key has its own problem reported already.)
            let Some(cond) = out.get(w.key).or_else(|| other.and_then(|t| t.get(w.key))) else { continue };
            let cond = match &cond.value {
                Value::Str(c) => c.clone(),
                Value::Bool(b) => b.to_string(),
                _ => unreachable!("`when` keys are choices or booleans"),
            };
            if !w.is.contains(&cond.as_str()) {
                if let Some(e) = entry {
                    let (wk, is) = (w.key, schema::quoted_list(w.is));
                    ctx.err(
                        &e.origin,
                        format!("`{}` only applies when `{wk}` is {is}, but {what}`{wk}` = \"{cond}\"", spec.path),
                    );
                }
                continue;
            }
        }
        let entry = match (entry, spec.default) {
            (Some(e), _) => e,
            (None, Default::Value(_)) => {
                let v = spec.default_value().expect("schema defaults are valid (tested)");
                Entry { value: v, origin: Origin::Default }
            }
            (None, Default::ByAlgorithm { .. }) => {
                let kind = match out.get("algorithm.kind").map(|e| &e.value) {
                    Some(Value::Str(k)) => k.clone(),
                    _ => continue, // its own problem is already reported
                };
                let v = spec.default_for(&kind).expect("schema defaults are valid (tested)");
                Entry { value: v, origin: Origin::Default }
            }
            (None, Default::SameAs(other)) => {
                let Some(e) = out.get(other) else { continue };
                Entry { value: e.value.clone(), origin: Origin::Default }
            }
            (None, Default::Optional) => continue,
            (None, Default::Required) => {
                let at = if what.is_empty() { format!("[{table}] ") } else { what.to_string() };
                ctx.err(&header, format!("{at}is missing required key `{}` ({})", spec.path, spec.doc));
                continue;
            }
        };
        out.keys.push((spec.path, entry));
    }
    out
}

// ---------------------------------------------------------------- typed settings and cross-key checks

fn get<'a>(t: &'a Filled, path: &str) -> &'a Value {
    &t.get(path).unwrap_or_else(|| panic!("`{path}` resolved")).value
}
fn int(t: &Filled, path: &str) -> i64 {
    match get(t, path) {
        Value::Int(i) => *i,
        v => unreachable!("`{path}` is typed as an integer, got {v:?}"),
    }
}
fn uint(t: &Filled, path: &str) -> u64 {
    int(t, path) as u64 // the schema's ranges keep every integer key ≥ 0
}
fn usz(t: &Filled, path: &str) -> usize {
    int(t, path) as usize
}
fn float(t: &Filled, path: &str) -> f64 {
    match get(t, path) {
        Value::Float(x) => *x,
        v => unreachable!("`{path}` is typed as a float, got {v:?}"),
    }
}
fn boolean(t: &Filled, path: &str) -> bool {
    match get(t, path) {
        Value::Bool(b) => *b,
        v => unreachable!("`{path}` is typed as a bool, got {v:?}"),
    }
}
fn string(t: &Filled, path: &str) -> String {
    match get(t, path) {
        Value::Str(s) => s.clone(),
        v => unreachable!("`{path}` is typed as a string, got {v:?}"),
    }
}
fn choice<T>(t: &Filled, path: &str, from: fn(&str) -> Option<T>) -> T {
    from(&string(t, path)).unwrap_or_else(|| unreachable!("`{path}` is checked against its enum's names"))
}
fn strings(t: &Filled, path: &str) -> Vec<String> {
    match get(t, path) {
        Value::List(items) => items
            .iter()
            .map(|v| match v {
                Value::Str(s) => s.clone(),
                v => unreachable!("`{path}` is a list of strings, got {v:?}"),
            })
            .collect(),
        v => unreachable!("`{path}` is typed as a list, got {v:?}"),
    }
}

fn build(tables: &BTreeMap<&'static str, Filled>, rewards: &[Filled], ctx: &mut Ctx) -> Option<Recipe> {
    let (run, model, data) = (&tables["run"], &tables["model"], &tables["data"]);
    let (rollout, algo, optim) = (&tables["rollout"], &tables["algorithm"], &tables["optim"]);
    let (shaping, eval) = (&tables["shaping"], &tables["eval"]);
    let kind = choice(algo, "algorithm.kind", AlgorithmKind::from_name);

    let data_source = parse_data_source(&string(data, "data.source"));
    let eval_data = match (eval.get("eval.source"), float(eval, "eval.split")) {
        (Some(_), _) => EvalData::Source(parse_data_source(&string(eval, "eval.source"))),
        (None, split) if split > 0.0 => EvalData::Split(split),
        (None, _) => EvalData::Off,
    };
    let rollout_source = match choice(rollout, "rollout.source", RolloutSourceKind::from_name) {
        RolloutSourceKind::Sample => RolloutSource::Sample,
        RolloutSourceKind::File => RolloutSource::File(PathBuf::from(string(rollout, "rollout.file"))),
    };
    let betas = match get(optim, "optim.betas") {
        Value::List(v) => match v.as_slice() {
            [Value::Float(a), Value::Float(b)] => [*a, *b],
            _ => unreachable!("optim.betas is a checked pair"),
        },
        _ => unreachable!("optim.betas is a checked pair"),
    };

    let mut reward_settings = Vec::new();
    for r in rewards {
        let source = match choice(r, "reward.kind", RewardKind::from_name) {
            RewardKind::Rule => RewardSource::Rule(match choice(r, "reward.rule", RuleKind::from_name) {
                RuleKind::ExactAnswer => Rule::ExactAnswer { field: string(r, "reward.field") },
                RuleKind::Regex => Rule::Regex { pattern: string(r, "reward.pattern") },
                RuleKind::Length => Rule::Length { target: usz(r, "reward.target") },
                RuleKind::Contains => Rule::Contains { text: string(r, "reward.text") },
            }),
            RewardKind::Model => RewardSource::Model {
                id: string(r, "reward.model"),
                chat: boolean(r, "reward.chat"),
                batch_size: usz(r, "reward.batch_size"),
            },
            RewardKind::Http => RewardSource::Http {
                urls: strings(r, "reward.urls"),
                label_field: string(r, "reward.label_field"),
                timeout: float(r, "reward.timeout"),
                max_retries: usz(r, "reward.max_retries"),
            },
            RewardKind::Command => RewardSource::Command {
                argv: strings(r, "reward.command"),
                timeout: float(r, "reward.timeout"),
                max_retries: usz(r, "reward.max_retries"),
            },
        };
        let gate = match (r.get("reward.gate.on"), r.get("reward.gate.min")) {
            (Some(_), Some(_)) => {
                Some(GateSettings { on: string(r, "reward.gate.on"), min: float(r, "reward.gate.min") })
            }
            _ => None, // a half-given gate is reported by cross_checks
        };
        reward_settings.push(RewardSettings {
            name: string(r, "reward.name"),
            weight: float(r, "reward.weight"),
            source,
            gate,
        });
    }

    let recipe = Recipe {
        run: RunSettings {
            name: string(run, "run.name"),
            output_dir: PathBuf::from(string(run, "run.output_dir")),
            seed: uint(run, "run.seed"),
            max_steps: uint(run, "run.max_steps"),
            log_every: uint(run, "run.log_every"),
            save_every: uint(run, "run.save_every"),
            keep_last: usz(run, "run.keep_last"),
            completions_every: uint(run, "run.completions_every"),
            max_bad_steps: uint(run, "run.max_bad_steps"),
            report_to: strings(run, "run.report_to")
                .iter()
                .map(|s| ReportTo::from_name(s).expect("checked by the schema"))
                .collect(),
        },
        model: ModelSettings {
            id: string(model, "model.id"),
            revision: string(model, "model.revision"),
            reference: model.get("model.reference").map(|_| string(model, "model.reference")),
            dtype: choice(model, "model.dtype", DTypeSpec::from_name),
            device: string(model, "model.device").parse::<DeviceSpec>().expect("checked by the schema"),
        },
        data: DataSettings {
            source: data_source,
            prompt_field: string(data, "data.prompt_field"),
            shuffle: boolean(data, "data.shuffle"),
            max_prompt_tokens: usz(data, "data.max_prompt_tokens"),
            chat: boolean(data, "data.chat"),
        },
        rollout: RolloutSettings {
            prompts_per_step: usz(rollout, "rollout.prompts_per_step"),
            num_generations: usz(rollout, "rollout.num_generations"),
            max_new_tokens: usz(rollout, "rollout.max_new_tokens"),
            temperature: float(rollout, "rollout.temperature"),
            top_p: float(rollout, "rollout.top_p"),
            top_k: usz(rollout, "rollout.top_k"),
            min_p: float(rollout, "rollout.min_p"),
            repetition_penalty: float(rollout, "rollout.repetition_penalty"),
            stop: strings(rollout, "rollout.stop"),
            source: rollout_source,
            batch_size: usz(rollout, "rollout.batch_size"),
            max_sampling_rounds: boolean(rollout, "rollout.dynamic_sampling")
                .then(|| usz(rollout, "rollout.max_sampling_rounds")),
            bf16_importance_cap: match choice(rollout, "rollout.weights", RolloutWeights::from_name) {
                RolloutWeights::Model => None,
                RolloutWeights::Bf16 => Some(float(rollout, "rollout.importance_cap")),
            },
        },
        algorithm: AlgorithmSettings {
            kind,
            settings: crate::algo::Settings::from_keys(kind, &TableKeys(tables)),
            micro_batch_size: usz(algo, "algorithm.micro_batch_size"),
        },
        optim: OptimSettings {
            lr: float(optim, "optim.lr"),
            betas,
            eps: float(optim, "optim.eps"),
            weight_decay: float(optim, "optim.weight_decay"),
            max_grad_norm: float(optim, "optim.max_grad_norm"),
            schedule: choice(optim, "optim.schedule", LrSchedule::from_name),
            warmup_steps: uint(optim, "optim.warmup_steps"),
        },
        shaping: crate::reward::shaping::ShapingConfig {
            kind: choice(shaping, "shaping.kind", ShapingKind::from_name),
            relative: boolean(shaping, "shaping.relative"),
            k: float(shaping, "shaping.k"),
            max_refs: usz(shaping, "shaping.max_refs"),
            ceil: shaping.get("shaping.ceil").map(|_| float(shaping, "shaping.ceil")),
            length_penalty: shaping.get("shaping.length_penalty.threshold").map(|_| {
                (usz(shaping, "shaping.length_penalty.threshold"), float(shaping, "shaping.length_penalty.per_token"))
            }),
        },
        lora: lora_settings(&tables["lora"]),
        eval: EvalSettings {
            data: eval_data,
            every: uint(eval, "eval.every"),
            num_samples: usz(eval, "eval.num_samples"),
            temperature: float(eval, "eval.temperature"),
            max_new_tokens: match usz(eval, "eval.max_new_tokens") {
                0 => usz(rollout, "rollout.max_new_tokens"),
                n => n,
            },
            max_prompts: usz(eval, "eval.max_prompts"),
            reward: eval.get("eval.reward").map(|_| string(eval, "eval.reward")),
            pass_threshold: float(eval, "eval.pass_threshold"),
        },
        rewards: reward_settings,
        resolved: Resolved {
            tables: schema::TABLES
                .iter()
                .filter_map(|t| tables.get(t.name))
                .flat_map(|t| t.keys.iter().map(|(p, e)| (*p, e.value.clone())))
                .collect(),
            rewards: rewards.iter().map(|r| r.keys.iter().map(|(p, e)| (*p, e.value.clone())).collect()).collect(),
        },
    };
    cross_checks(&recipe, tables, rewards, ctx);
    lora_checks(tables, ctx);
    Some(recipe)
}

/// `[lora]`: `None` when the table is absent (an absent optional table resolves to no keys).
fn lora_settings(t: &Filled) -> Option<LoraSettings> {
    t.get("lora.rank")?;
    let names = strings(t, "lora.targets");
    let targets = if names.iter().any(|n| n == "all-linear") {
        crate::model::lora::LINEAR_MODULES.iter().map(|m| m.to_string()).collect()
    } else {
        // Module order, whatever the recipe's order, so equal sets train equal adapters.
        crate::model::lora::LINEAR_MODULES
            .iter()
            .filter(|m| names.iter().any(|n| n == *m))
            .map(|m| m.to_string())
            .collect()
    };
    Some(LoraSettings {
        rank: usz(t, "lora.rank"),
        alpha: float(t, "lora.alpha"),
        dropout: float(t, "lora.dropout"),
        targets,
        rslora: boolean(t, "lora.rslora"),
        init: choice(t, "lora.init", LoraInit::from_name),
        base_dtype: choice(t, "lora.base_dtype", LoraBaseDtype::from_name),
    })
}

/// `[lora]`: targets that name layers, `all-linear` alone; `critic.lora` only with a `[lora]` table.
fn lora_checks(tables: &BTreeMap<&'static str, Filled>, ctx: &mut Ctx) {
    let t = &tables["lora"];
    let at = |key: &str| t.get(key).map(|e| e.origin.clone()).unwrap_or(t.header.clone());
    let critic = &tables["critic"];
    if let Some(e) = critic.get("critic.lora") {
        if boolean(critic, "critic.lora") && t.get("lora.rank").is_none() {
            ctx.err(
                &e.origin,
                "`critic.lora` = true takes the value model's adapters from the [lora] table (rank, alpha, targets), \
                 but the recipe has no [lora] table: add one, or set critic.lora = false",
            );
        }
    }
    if t.get("lora.targets").is_some() {
        let names = strings(t, "lora.targets");
        if names.is_empty() {
            ctx.err(
                &at("lora.targets"),
                "`lora.targets` is empty: name at least one layer (e.g. [\"q_proj\", \"v_proj\"]) or [\"all-linear\"]",
            );
        } else if names.len() > 1 && names.iter().any(|n| n == "all-linear") {
            ctx.err(
                &at("lora.targets"),
                "`lora.targets`: \"all-linear\" already names every linear layer; give it alone",
            );
        }
    }
}

/// `data.source` / `eval.source`: a built-in dataset or a JSONL path (the schema checked which).
fn parse_data_source(source: &str) -> DataSource {
    match source.strip_prefix("builtin:") {
        Some(name) => DataSource::Builtin(BuiltinData::from_name(name).expect("checked by the schema")),
        None => DataSource::Jsonl(PathBuf::from(source)),
    }
}

/// Checks that involve more than one key. Messages name every key involved so the user knows what to change.
fn cross_checks(r: &Recipe, tables: &BTreeMap<&'static str, Filled>, rewards: &[Filled], ctx: &mut Ctx) {
    let at = |table: &str, path: &str| -> Origin {
        let t = &tables[table];
        match t.get(path).map(|e| &e.origin) {
            Some(o) if *o != Origin::Default => o.clone(),
            _ => t.header.clone(),
        }
    };
    let ro = &r.rollout;
    let a = &r.algorithm;
    // The algorithm's own checks: each names the key it is about, for the line number.
    let reward_names: Vec<(String, bool)> =
        r.rewards.iter().map(|w| (w.name.clone(), matches!(w.source, super::RewardSource::Model { .. }))).collect();
    let sh = &r.shaping;
    let shape = crate::algo::RecipeShape {
        prompts_per_step: ro.prompts_per_step,
        num_generations: ro.num_generations,
        rewards: &reward_names,
        shaping: sh.kind != ShapingKind::None || sh.ceil.is_some() || sh.length_penalty.is_some(),
    };
    for p in a.settings.problems(&shape) {
        let origin = match (p.reward, p.key.split_once('.')) {
            (Some(i), _) => rewards.get(i).and_then(|t| t.get(p.key)).map(|e| e.origin.clone()),
            (None, Some((table, _))) => Some(at(table, p.key)),
            (None, None) => None,
        };
        ctx.err(&origin.unwrap_or(Origin::Default), p.message);
    }
    let needs = a.settings.needs();
    if ro.bf16_importance_cap.is_some() && !needs.importance_correction {
        ctx.err(
            &at("rollout", "rollout.weights"),
            format!(
                "`rollout.weights` = \"bf16\" is for grpo and grpo_lambda (their loss applies the importance \
                 correction); {} samples from the model's own weights",
                a.kind
            ),
        );
    }
    if ro.max_sampling_rounds.is_some() && !needs.groups {
        ctx.err(
            &at("rollout", "rollout.dynamic_sampling"),
            format!(
                "`rollout.dynamic_sampling` drops groups whose rewards are all equal, which is a signal only to \
                 algorithms that compare completions within a group; {} does not",
                a.kind
            ),
        );
    }
    if ro.max_sampling_rounds.is_some() && ro.source != RolloutSource::Sample {
        ctx.err(
            &at("rollout", "rollout.dynamic_sampling"),
            "`rollout.dynamic_sampling` samples more prompts when groups are dropped; a replayed file has no more to \
             sample: set rollout.source = \"sample\" or drop dynamic_sampling",
        );
    }
    if needs.groups && ro.num_generations < 2 {
        ctx.err(
            &at("rollout", "rollout.num_generations"),
            format!(
                "`rollout.num_generations` = {} but {} compares completions within a group: set it to 2 or more",
                ro.num_generations, a.kind
            ),
        );
    }
    let algo = &tables["algorithm"];
    let (eps, eps_high) = (float(algo, "algorithm.epsilon"), float(algo, "algorithm.epsilon_high"));
    if eps_high < eps {
        ctx.err(
            &at("algorithm", "algorithm.epsilon_high"),
            format!(
                "`algorithm.epsilon_high` = {eps_high} is below `algorithm.epsilon` = {eps}: raise epsilon_high or \
                 lower epsilon"
            ),
        );
    }
    let n = ro.completions_per_step();
    let mb = r.algorithm.micro_batch_size;
    if mb > 0 && !n.is_multiple_of(mb) {
        let divisors: Vec<String> = (1..=n).filter(|d| n.is_multiple_of(*d)).map(|d| d.to_string()).collect();
        ctx.err(
            &at("algorithm", "algorithm.micro_batch_size"),
            format!(
                "`rollout.prompts_per_step` × `rollout.num_generations` = {} × {} = {n} completions per step is not \
                 divisible by `algorithm.micro_batch_size` = {mb}: set algorithm.micro_batch_size to one of {} (or 0 \
                 for auto), or change rollout.prompts_per_step / rollout.num_generations",
                ro.prompts_per_step,
                ro.num_generations,
                divisors.join(", ")
            ),
        );
    }
    if r.optim.warmup_steps > r.run.max_steps {
        ctx.err(
            &at("optim", "optim.warmup_steps"),
            format!(
                "`optim.warmup_steps` = {} is longer than the run (`run.max_steps` = {}): lower warmup_steps or raise max_steps",
                r.optim.warmup_steps, r.run.max_steps
            ),
        );
    }
    if rewards.is_empty() {
        ctx.err(
            &Origin::Default,
            "no [[reward]] table: add at least one, e.g.\n\n[[reward]]\nname = \"correct\"\nrule = \"exact_answer\"\n",
        );
    }
    eval_checks(r, tables, ctx);
    gate_checks(r, rewards, ctx);
    for (i, reward) in r.rewards.iter().enumerate() {
        if let Some(j) = r.rewards[..i].iter().position(|o| o.name == reward.name) {
            let first = ctx.loc(&rewards[j].get("reward.name").map(|e| e.origin.clone()).unwrap_or(Origin::Default));
            ctx.err(
                &rewards[i].get("reward.name").map(|e| e.origin.clone()).unwrap_or(Origin::Default),
                format!(
                    "`reward.name` = \"{}\" is already used (at {first}); reward names must be unique",
                    reward.name
                ),
            );
        }
    }
}

/// `[eval]`: one source of held-out prompts, settings that only make sense with one, k samples that can differ,
/// and a reward that exists.
fn eval_checks(r: &Recipe, tables: &BTreeMap<&'static str, Filled>, ctx: &mut Ctx) {
    let t = &tables["eval"];
    let given = |path: &str| t.get(path).filter(|e| e.origin != Origin::Default).map(|e| e.origin.clone());
    let e = &r.eval;
    // The resolved recipe writes split = 0.0 beside a source: only a fraction above 0 holds rows out.
    if let (Some(_), Some(at)) = (t.get("eval.source"), given("eval.split").filter(|_| float(t, "eval.split") > 0.0)) {
        ctx.err(&at, "`eval.split` and `eval.source` both name held-out prompts: keep one of them");
    }
    if matches!(e.data, EvalData::Split(_)) && r.rollout.source != RolloutSource::Sample {
        ctx.err(
            &given("eval.split").unwrap_or(t.header.clone()),
            "`eval.split` holds out rows of data.source, which a replayed run (rollout.source = \"file\") does not \
             read: name the held-out prompts with eval.source instead",
        );
    }
    if e.num_samples > 1 && e.temperature == 0.0 {
        ctx.err(
            &given("eval.num_samples").unwrap_or(t.header.clone()),
            format!(
                "`eval.num_samples` = {} with `eval.temperature` = 0 (greedy) gives {} identical completions: set \
                 eval.temperature > 0 (e.g. 1.0) or eval.num_samples = 1",
                e.num_samples, e.num_samples
            ),
        );
    }
    if let Some(name) = &e.reward {
        let names: Vec<&str> = r.rewards.iter().map(|w| w.name.as_str()).collect();
        if !names.contains(&name.as_str()) {
            let hint = nearest(name, &names).map(|n| format!("; did you mean `{n}`?")).unwrap_or_default();
            ctx.err(
                &given("eval.reward").unwrap_or(t.header.clone()),
                format!(
                    "`eval.reward` = \"{name}\" is not a reward of this recipe (rewards: {}){hint}",
                    names.join(", ")
                ),
            );
        }
    }
}

/// G-RA gates: both keys or neither, `on` names another reward, and no cycles.
fn gate_checks(r: &Recipe, rewards: &[Filled], ctx: &mut Ctx) {
    let names: Vec<&str> = r.rewards.iter().map(|w| w.name.as_str()).collect();
    let mut gates = Vec::with_capacity(rewards.len());
    let mut ok = true;
    for (i, t) in rewards.iter().enumerate() {
        let (on, min) = (t.get("reward.gate.on"), t.get("reward.gate.min"));
        let at = |e: Option<&Entry>| e.map(|e| e.origin.clone()).unwrap_or(t.header.clone());
        match (on, min) {
            (None, None) => gates.push(None),
            (Some(_), None) | (None, Some(_)) => {
                ok = false;
                ctx.err(
                    &at(on.or(min)),
                    format!(
                        "reward `{}`: a gate needs both `on` and `min`, e.g. gate = {{ on = \"correct\", min = 1.0 }}",
                        names[i]
                    ),
                );
            }
            (Some(_), Some(_)) => {
                let g = r.rewards[i].gate.as_ref().expect("built from both keys");
                match names.iter().position(|n| *n == g.on) {
                    Some(j) => gates.push(Some(crate::reward::gate::Gate { on: j, min: g.min })),
                    None => {
                        ok = false;
                        let hint = nearest(&g.on, &names).map(|n| format!("; did you mean `{n}`?")).unwrap_or_default();
                        ctx.err(
                            &at(on),
                            format!(
                                "reward `{}` is gated on `{}`, which is not a reward of this recipe (rewards: {}){hint}",
                                names[i],
                                g.on,
                                names.join(", ")
                            ),
                        );
                    }
                }
            }
        }
    }
    if ok {
        if let Err(e) = crate::reward::gate::check_gates(&gates, &names) {
            let first = gates.iter().position(Option::is_some).unwrap_or(0);
            let at = rewards[first].get("reward.gate.on").map(|e| e.origin.clone()).unwrap_or(Origin::Default);
            ctx.err(&at, e.to_string());
        }
    }
}

/// The algorithms' view of the filled tables ([`crate::algo::Keys`]): a key by its full path.
struct TableKeys<'a>(&'a BTreeMap<&'static str, Filled>);

impl TableKeys<'_> {
    fn table(&self, path: &str) -> &Filled {
        let table = path.split('.').next().unwrap_or(path);
        self.0.get(table).unwrap_or_else(|| panic!("`{path}`: no table [{table}]"))
    }
}

impl crate::algo::Keys for TableKeys<'_> {
    fn float(&self, path: &str) -> f64 {
        float(self.table(path), path)
    }
    fn int(&self, path: &str) -> i64 {
        int(self.table(path), path)
    }
    fn boolean(&self, path: &str) -> bool {
        boolean(self.table(path), path)
    }
    fn string(&self, path: &str) -> String {
        string(self.table(path), path)
    }
    fn is_set(&self, path: &str) -> bool {
        self.table(path).get(path).is_some()
    }
}
