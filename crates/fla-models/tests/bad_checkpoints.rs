//! Broken and re-packaged checkpoints built from the tiny fixtures in temporary directories:
//! missing or mis-shaped tensors, unknown or unsupported config values, missing files; and
//! equivalent layouts that must load to the same logits (shards, f16/bf16, nested `qwen3_5`).
//! `Model::load` must return an error naming the culprit, never panic.
mod common;

use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

use common::{load_tensors, model_dir, reference, rel_err, TempDir};
use fla_core::io::save;
use fla_core::{DType, Error, Tensor};
use fla_models::checkpoint::eos_token_ids;
use fla_models::Model;
use serde_json::{json, Value};

type Tensors = BTreeMap<String, Tensor>;
/// An edit of config.json.
type Edit = Box<dyn FnOnce(&mut Value)>;
/// A config case: what it is, the edit, and the field the error must name.
type ConfigCase<'a> = (&'a str, Edit, &'a str);

fn read_config(fixture: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(model_dir(fixture).join("config.json")).unwrap()).unwrap()
}

fn write_config(dir: &Path, cfg: &Value) {
    std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(cfg).unwrap()).unwrap();
}

fn write_weights(path: &Path, tensors: &Tensors) {
    let meta = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
    save(tensors, Some(meta), path).unwrap();
}

/// A checkpoint directory from `fixture` with its config and tensors edited.
fn build(
    test: &str,
    fixture: &str,
    edit_config: impl FnOnce(&mut Value),
    edit_tensors: impl FnOnce(&mut Tensors),
) -> TempDir {
    let dir = TempDir::new(test);
    let src = model_dir(fixture);
    let mut cfg = read_config(fixture);
    edit_config(&mut cfg);
    write_config(dir.path(), &cfg);
    std::fs::copy(src.join("tokenizer.json"), dir.path().join("tokenizer.json")).unwrap();
    let mut tensors = load_tensors(&src);
    edit_tensors(&mut tensors);
    write_weights(&dir.path().join("model.safetensors"), &tensors);
    dir
}

/// `Model::load`, turning a panic into a test failure that names the case.
fn try_load(dir: &Path, case: &str) -> fla_core::Result<Model> {
    catch_unwind(AssertUnwindSafe(|| Model::load(dir))).unwrap_or_else(|_| panic!("Model::load panicked: {case}"))
}

fn load_err(dir: &Path, case: &str) -> Error {
    match try_load(dir, case) {
        Ok(_) => panic!("{case}: loaded, expected an error"),
        Err(e) => e,
    }
}

/// Logits of the fixture's reference inputs (both sequences, one pass).
fn ref_logits(model: &Model, fixture: &str) -> Vec<f32> {
    let r = reference(fixture);
    let seqs: Vec<&[u32]> = r.input_ids.iter().map(|s| &s[..]).collect();
    model.forward_logits(&seqs).unwrap()
}

fn fixture_logits(fixture: &str) -> Vec<f32> {
    ref_logits(&Model::load(&model_dir(fixture)).unwrap(), fixture)
}

fn case_name(fixture: &str, what: &str) -> String {
    let s: String = what.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect();
    format!("{fixture}-{s}")
}

// === Missing and mis-shaped tensors ===

fn check_missing(fixture: &str, names: &[&str]) {
    for name in names {
        let case = format!("{fixture} without `{name}`");
        let dir = build(&case_name(fixture, name), fixture, |_| {}, |t| assert!(t.remove(*name).is_some(), "{case}"));
        match load_err(dir.path(), &case) {
            Error::MissingTensor { name: got, .. } => assert_eq!(&got, name, "{case}: MissingTensor names"),
            e => panic!("{case}: expected MissingTensor, got {e:?}"),
        }
    }
}

#[test]
fn missing_tensor_qwen3_5() {
    check_missing(
        "qwen3_5_tiny",
        &[
            "model.layers.0.linear_attn.A_log",
            "model.layers.0.linear_attn.dt_bias",
            "model.layers.0.linear_attn.conv1d.weight",
            "model.layers.2.linear_attn.in_proj_b.weight",
            "model.layers.1.linear_attn.in_proj_z.weight",
            "model.layers.2.linear_attn.norm.weight",
            "model.layers.3.self_attn.k_norm.weight",
            "model.layers.3.self_attn.o_proj.weight",
            "model.layers.1.mlp.gate_proj.weight",
            "model.layers.2.post_attention_layernorm.weight",
            "model.norm.weight",
            "model.embed_tokens.weight",
        ],
    );
}

#[test]
fn missing_tensor_qwen3_next() {
    check_missing(
        "qwen3_next_tiny",
        &[
            "lm_head.weight",
            "model.layers.1.linear_attn.in_proj_qkvz.weight",
            "model.layers.0.linear_attn.in_proj_ba.weight",
            "model.layers.2.mlp.experts.3.down_proj.weight",
            "model.layers.0.mlp.experts.0.gate_proj.weight",
            "model.layers.0.mlp.gate.weight",
            "model.layers.1.mlp.shared_expert.up_proj.weight",
            "model.layers.0.mlp.shared_expert_gate.weight",
            "model.layers.3.self_attn.q_proj.weight",
            "model.layers.3.input_layernorm.weight",
        ],
    );
}

#[test]
fn missing_tensor_kimi_linear() {
    check_missing(
        "kimi_linear_tiny",
        &[
            "lm_head.weight",
            "model.layers.1.self_attn.A_log",
            "model.layers.2.self_attn.dt_bias",
            "model.layers.0.self_attn.f_b_proj.weight",
            "model.layers.0.self_attn.q_conv1d.weight",
            "model.layers.1.self_attn.o_norm.weight",
            "model.layers.2.block_sparse_moe.gate.e_score_correction_bias",
            "model.layers.1.block_sparse_moe.experts.2.w3.weight",
            "model.layers.3.block_sparse_moe.shared_experts.down_proj.weight",
            "model.layers.0.block_sparse_moe.down_proj.weight",
            "model.layers.3.self_attn.kv_a_layernorm.weight",
            "model.layers.3.self_attn.kv_b_proj.weight",
            "model.norm.weight",
        ],
    );
}

/// How a tensor is broken: a new shape with the same elements, or its first `n` rows along `dim`.
#[derive(Clone, Copy)]
enum Break {
    Reshape(&'static [usize]),
    Narrow(usize, usize),
}

/// `expected`: the shape the error must report (None: any shape with the original element count).
fn check_misshaped(fixture: &str, cases: &[(&str, Break, Option<&[usize]>)]) {
    for &(name, brk, expected) in cases {
        let case = format!("{fixture} with `{name}` broken");
        let original = load_tensors(&model_dir(fixture))[name].shape().to_vec();
        let mut got_shape = Vec::new();
        let dir = build(
            &case_name(fixture, name),
            fixture,
            |_| {},
            |t| {
                let x = &t[name];
                let y = match brk {
                    Break::Reshape(s) => x.reshape(s).unwrap(),
                    Break::Narrow(dim, n) => x.narrow(dim, 0, n).unwrap().contiguous().unwrap(),
                };
                got_shape = y.shape().to_vec();
                t.insert(name.to_string(), y);
            },
        );
        match load_err(dir.path(), &case) {
            Error::TensorShape { name: n, expected: e, got } => {
                assert_eq!(n, name, "{case}: TensorShape names");
                assert_eq!(got, got_shape, "{case}: got shape");
                match expected {
                    Some(want) => assert_eq!(e, want, "{case}: expected shape"),
                    None => assert_eq!(
                        e.iter().product::<usize>(),
                        original.iter().product::<usize>(),
                        "{case}: expected shape {e:?} vs the original {original:?}"
                    ),
                }
            }
            e => panic!("{case}: expected TensorShape, got {e:?}"),
        }
    }
}

#[test]
fn misshaped_tensor_qwen3_5() {
    check_misshaped(
        "qwen3_5_tiny",
        &[
            // Same elements, transposed arrangement: must not be silently reshaped.
            ("model.layers.0.linear_attn.in_proj_qkv.weight", Break::Reshape(&[64, 128]), Some(&[128, 64])),
            ("model.layers.1.linear_attn.A_log", Break::Narrow(0, 3), Some(&[4])),
            ("model.layers.2.linear_attn.conv1d.weight", Break::Narrow(2, 3), Some(&[128, 1, 4])),
            ("model.layers.0.linear_attn.norm.weight", Break::Narrow(0, 8), Some(&[16])),
            ("model.layers.3.self_attn.q_proj.weight", Break::Narrow(0, 120), Some(&[128, 64])),
            ("model.layers.3.self_attn.k_proj.weight", Break::Narrow(1, 60), Some(&[32, 64])),
            ("model.layers.1.mlp.down_proj.weight", Break::Reshape(&[96, 64]), Some(&[64, 96])),
            ("model.embed_tokens.weight", Break::Narrow(0, 500), Some(&[512, 64])),
            ("model.norm.weight", Break::Narrow(0, 32), Some(&[64])),
        ],
    );
}

#[test]
fn misshaped_tensor_qwen3_next() {
    check_misshaped(
        "qwen3_next_tiny",
        &[
            ("model.layers.0.linear_attn.in_proj_ba.weight", Break::Narrow(0, 6), Some(&[8, 64])),
            ("model.layers.1.linear_attn.in_proj_qkvz.weight", Break::Reshape(&[64, 192]), Some(&[192, 64])),
            ("model.layers.2.mlp.experts.1.down_proj.weight", Break::Narrow(1, 30), Some(&[64, 32])),
            ("model.layers.0.mlp.gate.weight", Break::Narrow(0, 3), Some(&[4, 64])),
            ("model.layers.1.mlp.shared_expert_gate.weight", Break::Narrow(1, 60), Some(&[1, 64])),
            ("model.layers.3.mlp.shared_expert.gate_proj.weight", Break::Narrow(0, 16), Some(&[32, 64])),
            ("lm_head.weight", Break::Narrow(0, 511), Some(&[512, 64])),
        ],
    );
}

#[test]
fn misshaped_tensor_kimi_linear() {
    check_misshaped(
        "kimi_linear_tiny",
        &[
            ("model.layers.0.self_attn.A_log", Break::Narrow(2, 3), None),
            ("model.layers.0.self_attn.q_proj.weight", Break::Narrow(1, 48), Some(&[64, 64])),
            ("model.layers.1.self_attn.dt_bias", Break::Narrow(0, 60), Some(&[64])),
            ("model.layers.2.self_attn.k_conv1d.weight", Break::Narrow(2, 2), Some(&[64, 1, 4])),
            ("model.layers.1.block_sparse_moe.experts.0.w2.weight", Break::Narrow(1, 31), Some(&[64, 32])),
            ("model.layers.3.self_attn.kv_a_proj_with_mqa.weight", Break::Narrow(0, 20), Some(&[24, 64])),
            ("model.layers.3.self_attn.kv_b_proj.weight", Break::Narrow(0, 64), Some(&[128, 16])),
        ],
    );
}

// === Config errors ===

/// Each edit of the fixture's config must fail with `Error::Config` whose field `accept` takes.
fn check_config(fixture: &str, cases: Vec<ConfigCase>) {
    for (what, edit, field) in cases {
        let case = format!("{fixture}: {what}");
        let dir = build(&case_name(fixture, what), fixture, edit, |_| {});
        match load_err(dir.path(), &case) {
            Error::Config { field: got, msg } => {
                assert!(
                    got == field || got.ends_with(&format!(".{field}")),
                    "{case}: field `{got}` ({msg}), want `{field}`"
                )
            }
            e => panic!("{case}: expected Error::Config for `{field}`, got {e:?}"),
        }
    }
}

fn set(key: &'static str, v: Value) -> Edit {
    Box::new(move |c: &mut Value| {
        c[key] = v;
    })
}

fn remove(key: &'static str) -> Edit {
    Box::new(move |c: &mut Value| {
        c.as_object_mut().unwrap().remove(key);
    })
}

#[test]
fn unknown_model_type() {
    for fixture in ["qwen3_5_tiny", "qwen3_next_tiny", "kimi_linear_tiny"] {
        check_config(
            fixture,
            vec![
                ("llama", set("model_type", json!("llama")), "model_type"),
                ("qwen3_5_moe", set("model_type", json!("qwen3_5_moe")), "model_type"),
                ("empty model_type", set("model_type", json!("")), "model_type"),
                ("numeric model_type", set("model_type", json!(5)), "model_type"),
                ("no model_type", remove("model_type"), "model_type"),
            ],
        );
    }
}

fn layer_types(types: Value) -> Edit {
    set("layer_types", types)
}

fn qwen_unsupported(fixture: &str) {
    check_config(
        fixture,
        vec![
            ("gelu", set("hidden_act", json!("gelu")), "hidden_act"),
            ("attention_bias", set("attention_bias", json!(true)), "attention_bias"),
            (
                "sliding layer",
                layer_types(json!(["linear_attention", "sliding_attention", "linear_attention", "full_attention"])),
                "layer_types",
            ),
            (
                "3 layer types",
                layer_types(json!(["linear_attention", "linear_attention", "full_attention"])),
                "layer_types",
            ),
            (
                "5 layer types",
                layer_types(json!([
                    "linear_attention",
                    "linear_attention",
                    "linear_attention",
                    "full_attention",
                    "full_attention"
                ])),
                "layer_types",
            ),
            ("layer types not strings", layer_types(json!([0, 0, 0, 1])), "layer_types"),
            ("yarn", Box::new(|c: &mut Value| c["rope_parameters"]["rope_type"] = json!("yarn")), "rope_type"),
            (
                "legacy yarn rope_scaling",
                set("rope_scaling", json!({"rope_type": "yarn", "factor": 4.0})),
                "rope_scaling",
            ),
            ("kv heads do not divide", set("num_key_value_heads", json!(3)), "num_key_value_heads"),
            ("layers as a string", set("num_hidden_layers", json!("four")), "num_hidden_layers"),
            ("negative width", set("hidden_size", json!(-64)), "hidden_size"),
            ("fractional width", set("hidden_size", json!(64.5)), "hidden_size"),
        ],
    );
}

#[test]
fn unsupported_config_qwen3_5() {
    qwen_unsupported("qwen3_5_tiny");
    check_config(
        "qwen3_5_tiny",
        vec![
            ("qwen3_5 moe", set("num_experts", json!(4)), "num_experts"),
            ("qwen3_5 without text_config", set("model_type", json!("qwen3_5")), "text_config"),
        ],
    );
}

#[test]
fn unsupported_config_qwen3_next() {
    qwen_unsupported("qwen3_next_tiny");
}

#[test]
fn unsupported_config_kimi_linear() {
    check_config(
        "kimi_linear_tiny",
        vec![
            ("gelu", set("hidden_act", json!("gelu")), "hidden_act"),
            ("layers as a string", set("num_hidden_layers", json!("four")), "num_hidden_layers"),
            ("gated MLA output", set("mla_use_output_gate", json!(true)), "mla_use_output_gate"),
            ("safe_gate as a string", set("safe_gate", json!("yes")), "safe_gate"),
            (
                "safe gate, lower bound 0",
                set_all(&[("safe_gate", json!(true)), ("gate_lower_bound", json!(0.0))]),
                "gate_lower_bound",
            ),
        ],
    );
}

/// The safe gate of later Kimi variants changes the model (it is read, not ignored), and
/// `mla_use_output_gate: false` is the release's behaviour.
#[test]
fn kimi_linear_gate_variants() {
    let fixture = "kimi_linear_tiny";
    let want = fixture_logits(fixture);
    let dir = build(&case_name(fixture, "no output gate"), fixture, set("mla_use_output_gate", json!(false)), |_| {});
    let same = ref_logits(&try_load(dir.path(), "no output gate").unwrap(), fixture);
    assert!(rel(&same, &want) < 1e-4, "mla_use_output_gate: false changed the logits");
    let edit = set_all(&[("safe_gate", json!(true)), ("gate_lower_bound", json!(-5.0))]);
    let dir = build(&case_name(fixture, "safe gate"), fixture, edit, |_| {});
    let safe = ref_logits(&try_load(dir.path(), "safe gate").unwrap(), fixture);
    assert!(safe.iter().all(|x| x.is_finite()));
    assert!(rel(&safe, &want) > 1e-3, "safe_gate: true left the logits unchanged");
}

fn set_all(kv: &[(&'static str, Value)]) -> Edit {
    let kv = kv.to_vec();
    Box::new(move |c: &mut Value| {
        for (k, v) in &kv {
            c[*k] = v.clone();
        }
    })
}

fn rel(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(&x, &y)| (x as f64 - y as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|&y| (y as f64).powi(2)).sum();
    (num / den).sqrt()
}

#[test]
fn missing_config_field() {
    let common = ["hidden_size", "vocab_size", "num_attention_heads", "num_key_value_heads"];
    let qwen = ["linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim", "linear_value_head_dim"];
    let cases = |fixture: &str, extra: &[&'static str]| {
        let mut v: Vec<ConfigCase> = Vec::new();
        for &f in common.iter().chain(extra) {
            v.push((f, remove(f), f));
        }
        v.push(("null hidden_size", set("hidden_size", Value::Null), "hidden_size"));
        check_config(fixture, v);
    };
    cases("qwen3_5_tiny", &qwen);
    let mut next = qwen.to_vec();
    next.extend(["num_experts_per_tok", "moe_intermediate_size"]);
    cases("qwen3_next_tiny", &next);
    let kimi_common = ["hidden_size", "vocab_size"];
    let mut v: Vec<ConfigCase> = Vec::new();
    for f in kimi_common {
        v.push((f, remove(f), f));
    }
    check_config("kimi_linear_tiny", v);
}

// === Missing and malformed files ===

#[test]
fn missing_and_malformed_files() {
    // No weights at all.
    let dir = build("no-weights", "qwen3_5_tiny", |_| {}, |_| {});
    std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();
    let e = load_err(dir.path(), "no model.safetensors");
    assert!(!matches!(e, Error::Config { .. }), "no weights: {e:?}");
    assert!(e.to_string().contains("model.safetensors"), "no weights: `{e}` should name model.safetensors");

    // No directory / no config.json.
    let missing = dir.path().join("does-not-exist");
    let e = load_err(&missing, "no directory");
    assert!(e.to_string().contains("config.json"), "no directory: `{e}` should name config.json");

    // config.json that is not JSON, or not an object.
    std::fs::write(dir.path().join("config.json"), "{\"model_type\": \"qwen3_5_text\",").unwrap();
    let e = load_err(dir.path(), "truncated config.json");
    assert!(e.to_string().contains("config.json"), "bad JSON: `{e}` should name config.json");
    std::fs::write(dir.path().join("config.json"), "[1, 2]").unwrap();
    load_err(dir.path(), "config.json is a list");

    // Weights that are not safetensors, or truncated.
    let dir = build("garbage-weights", "qwen3_5_tiny", |_| {}, |_| {});
    let path = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    load_err(dir.path(), "truncated model.safetensors");
    std::fs::write(&path, &bytes[..5]).unwrap();
    load_err(dir.path(), "5-byte model.safetensors");
    std::fs::write(&path, b"not a safetensors file at all, just some text").unwrap();
    load_err(dir.path(), "text model.safetensors");
    std::fs::write(&path, []).unwrap();
    load_err(dir.path(), "empty model.safetensors");
}

// === Shards ===

/// Splits `tensors` into `model-0000i-of-00002.safetensors` with an index, in `dir`.
fn write_shards(dir: &Path, tensors: &Tensors) -> Vec<String> {
    let files = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"];
    let mut shards = [Tensors::new(), Tensors::new()];
    let mut map = serde_json::Map::new();
    for (i, (name, t)) in tensors.iter().enumerate() {
        shards[i % 2].insert(name.clone(), t.clone());
        map.insert(name.clone(), json!(files[i % 2]));
    }
    for (f, s) in files.iter().zip(&shards) {
        write_weights(&dir.join(f), s);
    }
    let index = json!({"metadata": {"total_size": 0}, "weight_map": map});
    std::fs::write(dir.join("model.safetensors.index.json"), serde_json::to_string_pretty(&index).unwrap()).unwrap();
    files.iter().map(|s| s.to_string()).collect()
}

fn check_sharded(fixture: &str) {
    let want = fixture_logits(fixture);
    let dir = build(&format!("{fixture}-sharded"), fixture, |_| {}, |_| {});
    std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();
    let tensors = load_tensors(&model_dir(fixture));
    let files = write_shards(dir.path(), &tensors);
    let model = try_load(dir.path(), "sharded").unwrap_or_else(|e| panic!("{fixture}: sharded load failed: {e}"));
    let got = ref_logits(&model, fixture);
    let err = rel_err(&got, &want);
    assert!(err <= 1e-6, "{fixture}: sharded vs single file rel err {err}");
    let err = rel_err(&got, &reference(fixture).logits);
    assert!(err <= 1e-4, "{fixture}: sharded vs HF rel err {err}");

    // A shard listed in the index but absent.
    std::fs::remove_file(dir.path().join(&files[1])).unwrap();
    let e = load_err(dir.path(), "missing shard");
    assert!(e.to_string().contains(&files[1]), "{fixture}: `{e}` should name the missing shard {}", files[1]);

    // A tensor in both shards.
    let first = tensors.keys().next().unwrap().clone();
    let mut second: Tensors = tensors.iter().skip(1).step_by(2).map(|(n, t)| (n.clone(), t.clone())).collect();
    second.insert(first.clone(), tensors[&first].clone());
    write_weights(&dir.path().join(&files[1]), &second);
    let e = load_err(dir.path(), "duplicated tensor");
    assert!(e.to_string().contains(&first), "{fixture}: `{e}` should name the duplicated tensor {first}");

    // An index without a weight map.
    std::fs::write(dir.path().join("model.safetensors.index.json"), "{\"metadata\": {}}").unwrap();
    let e = load_err(dir.path(), "index without weight_map");
    assert!(e.to_string().contains("weight_map"), "{fixture}: `{e}` should name weight_map");
}

#[test]
fn sharded_qwen3_5() {
    check_sharded("qwen3_5_tiny");
}

#[test]
fn sharded_qwen3_next() {
    check_sharded("qwen3_next_tiny");
}

#[test]
fn sharded_kimi_linear() {
    check_sharded("kimi_linear_tiny");
}

// === Half-precision weights ===

/// `fixture` with every tensor (but 1-D ones when `keep_f32`) rounded to `dt`, stored either in
/// `dt` or, rounded, back in f32.
fn rounded_model(fixture: &str, dt: DType, keep_f32: bool, store_f32: bool) -> Model {
    let case = format!(
        "{fixture} in {dt}{}{}",
        if keep_f32 { " + f32 1-D" } else { "" },
        if store_f32 { " as f32" } else { "" }
    );
    let dir = build(
        &case_name(fixture, &case),
        fixture,
        |c| c["dtype"] = json!(if dt == DType::F16 { "float16" } else { "bfloat16" }),
        |t| {
            for x in t.values_mut() {
                if !(keep_f32 && x.shape().iter().filter(|&&d| d > 1).count() <= 1) {
                    let y = x.to_dtype(dt).unwrap();
                    assert_eq!(y.dtype(), dt);
                    *x = if store_f32 { y.to_dtype(DType::F32).unwrap() } else { y };
                }
            }
        },
    );
    try_load(dir.path(), &case).unwrap_or_else(|e| panic!("{case}: load failed: {e}"))
}

/// Logits of `seq` prefilled with 3 tokens, then decoded one token at a time (the few-row
/// matrix-vector path of half-precision weights).
fn decode_logits(model: &Model, seq: &[u32]) -> Vec<f32> {
    let mut cache = model.new_cache(1);
    let mut out = model.logits(&model.forward_hidden(&[&seq[..3]], &mut cache).unwrap().0).unwrap();
    for t in &seq[3..] {
        out.extend(model.logits(&model.forward_hidden(&[&[*t]], &mut cache).unwrap().0).unwrap());
    }
    out
}

/// f16 / bf16 checkpoints (and bf16 with f32 1-D tensors, as releases keep `A_log` and norms)
/// load and give the logits of the same rounded values in f32: only the weights' rounding may
/// move the logits. Against the original f32 weights, f16 stays within 1e-2; bf16 rounding alone
/// moves these tiny random models' logits by 5e-2 to 1.2e-1 (measured with the rounded values
/// stored as f32), so it is only bounded loosely.
fn check_half(fixture: &str) {
    let want = fixture_logits(fixture);
    for (dt, keep_f32, vs_f32) in [(DType::F16, false, 1e-2), (DType::BF16, false, 0.25), (DType::BF16, true, 0.25)] {
        let case = format!("{fixture} in {dt}{}", if keep_f32 { " with f32 1-D tensors" } else { "" });
        let half = rounded_model(fixture, dt, keep_f32, false);
        let same_values = rounded_model(fixture, dt, keep_f32, true);
        let got = ref_logits(&half, fixture);
        let err = rel_err(&got, &ref_logits(&same_values, fixture));
        assert!(err <= 1e-5, "{case}: rel err {err} vs the same rounded weights stored as f32");
        let seq = &reference(fixture).input_ids[1][..16];
        let err = rel_err(&decode_logits(&half, seq), &decode_logits(&same_values, seq));
        assert!(err <= 1e-5, "{case}: decoding: rel err {err} vs the same rounded weights stored as f32");
        let err = rel_err(&decode_logits(&half, seq), &half.forward_logits(&[seq]).unwrap());
        assert!(err <= 1e-4, "{case}: decoding vs one pass: rel err {err}");
        let err = rel_err(&got, &want);
        assert!(err <= vs_f32, "{case}: rel err {err} vs f32 weights (bound {vs_f32})");
        assert!(err > 0.0, "{case}: identical to f32, were the weights rounded at all?");
    }
}

#[test]
fn half_precision_qwen3_5() {
    check_half("qwen3_5_tiny");
}

#[test]
fn half_precision_qwen3_next() {
    check_half("qwen3_next_tiny");
}

#[test]
fn half_precision_kimi_linear() {
    check_half("kimi_linear_tiny");
}

// === qwen3_5 (nested text_config, weights under model.language_model.) ===

fn nested(c: &mut Value, tie: Option<bool>, text_tie: Option<bool>) {
    let mut text = c.clone();
    match text_tie {
        Some(t) => text["tie_word_embeddings"] = json!(t),
        None => {
            text.as_object_mut().unwrap().remove("tie_word_embeddings");
        }
    }
    let mut top = json!({
        "architectures": ["Qwen3_5ForConditionalGeneration"],
        "model_type": "qwen3_5",
        "text_config": text,
        "vision_config": {"model_type": "qwen3_5", "depth": 1, "hidden_size": 8},
        "image_token_id": 500,
        "video_token_id": 501,
        "transformers_version": "5.17.0",
    });
    if let Some(t) = tie {
        top["tie_word_embeddings"] = json!(t);
    }
    *c = top;
}

fn rename(t: &mut Tensors, lm_head: bool) {
    let old = std::mem::take(t);
    for (name, x) in old {
        let name = match name.strip_prefix("model.") {
            Some(rest) => format!("model.language_model.{rest}"),
            None => name,
        };
        t.insert(name, x);
    }
    // Vision tower and MTP weights of the release, which the text model ignores.
    t.insert("model.visual.blocks.0.attn.qkv.weight".into(), Tensor::from_vec(vec![0.5f32; 24 * 8], &[24, 8]).unwrap());
    t.insert("mtp.fc.weight".into(), Tensor::from_vec(vec![0.25f32; 64 * 128], &[64, 128]).unwrap());
    if lm_head {
        let e = t["model.language_model.embed_tokens.weight"].clone();
        t.insert("lm_head.weight".into(), e);
    }
}

#[test]
fn qwen3_5_nested_matches_qwen3_5_text() {
    let fixture = "qwen3_5_tiny";
    let want = fixture_logits(fixture);
    let hf = reference(fixture).logits;
    let variants: [(&str, Option<bool>, Option<bool>, bool); 4] = [
        ("tie in text_config", None, Some(true), false),
        ("tie at top level", Some(true), None, false),
        ("tie in both", Some(true), Some(true), false),
        ("untied lm_head", Some(false), Some(false), true),
    ];
    for (what, tie, text_tie, lm_head) in variants {
        let case = format!("qwen3_5 {what}");
        let dir = build(&case_name(fixture, what), fixture, |c| nested(c, tie, text_tie), |t| rename(t, lm_head));
        let model = try_load(dir.path(), &case).unwrap_or_else(|e| panic!("{case}: load failed: {e}"));
        let got = ref_logits(&model, fixture);
        let err = rel_err(&got, &want);
        assert!(err <= 1e-6, "{case}: rel err {err} vs qwen3_5_text");
        let err = rel_err(&got, &hf);
        assert!(err <= 1e-4, "{case}: rel err {err} vs HF");
    }
    // Nested config with the weights still under `model.`: the error names the full
    // `model.language_model.` tensor.
    let dir = build("qwen3_5-nested-old-names", fixture, |c| nested(c, None, Some(true)), |_| {});
    match load_err(dir.path(), "qwen3_5 with qwen3_5_text tensor names") {
        Error::MissingTensor { name, .. } => {
            assert!(
                name.starts_with("model.language_model."),
                "missing tensor `{name}` should be under model.language_model."
            )
        }
        e => panic!("qwen3_5 with old names: expected MissingTensor, got {e:?}"),
    }
    // Untied without lm_head.weight.
    let dir = build("qwen3_5-nested-no-head", fixture, |c| nested(c, Some(false), Some(false)), |t| rename(t, false));
    match load_err(dir.path(), "qwen3_5 untied without lm_head") {
        Error::MissingTensor { name, .. } => assert_eq!(name, "lm_head.weight"),
        e => panic!("qwen3_5 untied without lm_head: expected MissingTensor, got {e:?}"),
    }
}

/// Equivalent spellings of the same Qwen3.5 config load to the same logits.
#[test]
fn qwen3_5_equivalent_configs() {
    let fixture = "qwen3_5_tiny";
    let want = fixture_logits(fixture);
    let edits: Vec<(&str, Edit)> = vec![
        (
            "full_attention_interval instead of layer_types",
            Box::new(|c: &mut Value| {
                c.as_object_mut().unwrap().remove("layer_types");
                c["full_attention_interval"] = json!(4);
            }),
        ),
        (
            "rope settings at the top level",
            Box::new(|c: &mut Value| {
                c.as_object_mut().unwrap().remove("rope_parameters");
                c["rope_theta"] = json!(10000.0);
                c["partial_rotary_factor"] = json!(0.25);
            }),
        ),
        ("null rope_scaling", set("rope_scaling", Value::Null)),
        ("silu spelled out", set("hidden_act", json!("silu"))),
    ];
    for (what, edit) in edits {
        let dir = build(&case_name(fixture, what), fixture, edit, |_| {});
        let model = try_load(dir.path(), what).unwrap_or_else(|e| panic!("{what}: load failed: {e}"));
        let err = rel_err(&ref_logits(&model, fixture), &want);
        assert!(err <= 1e-6, "{what}: rel err {err}");
    }
}

// === generation_config.json ===

#[test]
fn eos_token_ids_from_checkpoint() {
    assert_eq!(eos_token_ids(&model_dir("kimi_linear_tiny")).unwrap(), vec![2]);
    assert_eq!(eos_token_ids(&model_dir("qwen3_5_tiny")).unwrap(), Vec::<u32>::new());
    let dir = build("eos", "qwen3_5_tiny", |c| c["eos_token_id"] = json!(3), |_| {});
    assert_eq!(eos_token_ids(dir.path()).unwrap(), vec![3], "from config.json");
    std::fs::write(dir.path().join("generation_config.json"), "{\"eos_token_id\": [5, 7]}").unwrap();
    assert_eq!(eos_token_ids(dir.path()).unwrap(), vec![5, 7], "generation_config.json first");
    std::fs::write(dir.path().join("generation_config.json"), "{\"eos_token_id\": null}").unwrap();
    assert_eq!(eos_token_ids(dir.path()).unwrap(), vec![3], "null falls back to config.json");
}
