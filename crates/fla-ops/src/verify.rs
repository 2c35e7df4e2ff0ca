//! Checking the forms against a kernel fixture (`../shared/fixtures/kernels`): the code behind
//! `fla verify` and the fixture tests.
//!
//! A fixture holds the inputs, upstream gradients, outputs and gradients of one case of the
//! recurrence, computed in float64. Every form that applies runs on its inputs in f32; each
//! output and gradient is compared by `‖ours − ref‖ / ‖ref‖`. With CUDA, the forms that have a GPU
//! kernel run there too.
use std::collections::BTreeMap;
use std::path::Path;

use fla_core::io::SafeTensorsFile;
use fla_core::{Error, Result, Tensor};

use crate::{chunk, naive, recurrent, Family, Inputs, Options};

/// Relative-error tolerance of every check in f32.
pub const TOLERANCE: f64 = 1e-4;

/// The result of one form on one fixture.
#[derive(Debug, Clone)]
pub struct FormReport {
    /// Fixture file stem.
    pub fixture: String,
    /// Family run.
    pub family: Family,
    /// Form: `naive`, `chunk` or `recurrent`.
    pub form: &'static str,
    /// Device the form ran on: `cpu` or `cuda`.
    pub device: &'static str,
    /// Relative error of each compared tensor, by fixture name (`o`, `ht`, `dq`, ...).
    pub errors: BTreeMap<String, f64>,
}

impl FormReport {
    /// Whether every error is within [`TOLERANCE`] (NaN fails).
    pub fn passed(&self) -> bool {
        self.errors.values().all(|&e| e <= TOLERANCE)
    }
    /// One JSON line.
    pub fn to_json(&self) -> String {
        serde_json::json!({
            "fixture": self.fixture,
            "op": self.family.name(),
            "form": self.form,
            "device": self.device,
            "pass": self.passed(),
            "tolerance": TOLERANCE,
            "rel_err": self.errors,
        })
        .to_string()
    }
}

fn meta_usize(meta: &std::collections::HashMap<String, String>, key: &str) -> Result<usize> {
    meta.get(key)
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| Error::Msg(format!("fixture metadata `{key}` missing or not an integer")))
}

/// Runs every applicable form on the fixture at `path` on the CPU.
pub fn verify_fixture(path: &Path) -> Result<Vec<FormReport>> {
    verify_fixture_on(path, false)
}

/// Runs every applicable form on the fixture at `path`, and with `cuda` also every form that has
/// a GPU kernel on the first CUDA device: the recurrent step, and the chunk forward of Gated
/// DeltaNet (outputs `o`, `ht` only).
pub fn verify_fixture_on(path: &Path, cuda: bool) -> Result<Vec<FormReport>> {
    let file = SafeTensorsFile::open(path)?;
    let meta = file.metadata()?;
    let op = meta.get("op").ok_or_else(|| Error::Msg(format!("{}: no `op` in metadata", path.display())))?;
    let family =
        Family::from_fixture_op(op).ok_or_else(|| Error::Msg(format!("{}: unknown op `{op}`", path.display())))?;
    let scale: f64 = meta
        .get("scale")
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| Error::Msg("fixture metadata `scale` missing".into()))?;
    let _ = meta_usize(&meta, "T")?;
    let cu: Option<Vec<usize>> = match meta.get("cu_seqlens").map(|s| s.trim()) {
        None | Some("") | Some("[]") => None,
        Some(s) => Some(serde_json::from_str(s).map_err(|e| Error::Msg(format!("fixture cu_seqlens `{s}`: {e}")))?),
    };
    let get = |name: &str| file.tensor(name);
    let opt = |name: &str| {
        if file.contains(name) {
            file.tensor(name).map(Some)
        } else {
            Ok(None)
        }
    };
    let (q, k, v, h0) = (get("q")?, get("k")?, get("v")?, get("h0")?);
    let g = if family.decay() == crate::Decay::None { None } else { opt("g")? };
    let beta = if family.erase() == crate::Erase::Beta { opt("beta")? } else { None };
    let (b, w) = if family.erase() == crate::Erase::Channel { (opt("b")?, opt("w")?) } else { (None, None) };
    let inputs = Inputs {
        g: g.as_ref(),
        beta: beta.as_ref(),
        b: b.as_ref(),
        w: w.as_ref(),
        initial_state: Some(&h0),
        cu_seqlens: cu.as_deref(),
        ..Inputs::new(&q, &k, &v)
    };
    let opts = Options { scale: Some(scale), output_final_state: true, ..Options::default() };
    let (o_ref, ht_ref) = (get("o")?, get("ht")?);
    let fixture = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let report = |form, errors| FormReport { fixture: fixture.clone(), family, form, device: "cpu", errors };
    let fwd_errors = |o: &Tensor, ht: &Tensor| -> Result<BTreeMap<String, f64>> {
        Ok(BTreeMap::from([("o".to_string(), o.rel_err(&o_ref)?), ("ht".to_string(), ht.rel_err(&ht_ref)?)]))
    };
    let mut out = Vec::new();

    let naive = naive::forward(family, &inputs, &opts)?;
    out.push(report("naive", fwd_errors(&naive.o, naive.final_state.as_ref().expect("requested"))?));

    let fwd = chunk::forward(family, &inputs, &opts)?;
    let mut errors = fwd_errors(&fwd.o, fwd.final_state.as_ref().expect("requested"))?;
    let grads = chunk::backward(family, &inputs, &opts, &get("do")?, Some(&get("dht")?))?;
    let ours = [
        ("dq", Some(&grads.dq)),
        ("dk", Some(&grads.dk)),
        ("dv", Some(&grads.dv)),
        ("dg", grads.dg.as_ref()),
        ("dbeta", grads.dbeta.as_ref()),
        ("db", grads.db.as_ref()),
        ("dw", grads.dw.as_ref()),
        ("dh0", grads.dh0.as_ref()),
    ];
    for (name, t) in ours {
        if let (Some(t), true) = (t, file.contains(name)) {
            errors.insert(name.to_string(), t.rel_err(&get(name)?)?);
        }
    }
    out.push(report("chunk", errors));

    let mut state = h0.clone();
    let o = recurrent::step(family, &Inputs { initial_state: None, ..inputs }, &opts, &mut state)?;
    out.push(report("recurrent", fwd_errors(&o, &state)?));
    if cuda {
        let (o, ht) = recurrent_on_gpu(family, &inputs, &opts)?;
        out.push(FormReport { device: "cuda", ..report("recurrent", fwd_errors(&o, &ht)?) });
        if matches!(family, Family::GatedDeltaRule | Family::DeltaRule | Family::Kda) {
            let (o, ht) = chunk_on_gpu(family, &inputs, &opts)?;
            out.push(FormReport { device: "cuda", ..report("chunk", fwd_errors(&o, &ht)?) });
        }
    }
    Ok(out)
}

/// The recurrent form on the first CUDA device, over the same inputs; returns `(o, final state)`
/// on the host.
fn recurrent_on_gpu(family: Family, x: &Inputs<'_>, opts: &Options) -> Result<(Tensor, Tensor)> {
    use fla_core::cuda::{CudaDevice, CudaTensor};
    let dev = CudaDevice::get(0)?;
    let up = |t: Option<&Tensor>| t.map(|t| CudaTensor::from_host(t, &dev)).transpose();
    let (q, k, v) =
        (CudaTensor::from_host(x.q, &dev)?, CudaTensor::from_host(x.k, &dev)?, CudaTensor::from_host(x.v, &dev)?);
    let (g, beta, b, w) = (up(x.g)?, up(x.beta)?, up(x.b)?, up(x.w)?);
    let mut state = CudaTensor::from_host(x.initial_state.expect("fixtures carry h0"), &dev)?;
    let inputs = Inputs {
        g: g.as_ref(),
        beta: beta.as_ref(),
        b: b.as_ref(),
        w: w.as_ref(),
        initial_state: None,
        a_log: None,
        dt_bias: None,
        cu_seqlens: x.cu_seqlens,
        ..Inputs::new(&q, &k, &v)
    };
    let o = recurrent::step_cuda(family, &inputs, opts, &mut state, None)?;
    Ok((o.to_host()?, state.to_host()?))
}

/// The chunk forward on the first CUDA device, over the same inputs (f32 on the host); returns
/// `(o, final state)` on the host.
fn chunk_on_gpu(family: Family, x: &Inputs<'_>, opts: &Options) -> Result<(Tensor, Tensor)> {
    use fla_core::cuda::{CudaDevice, CudaTensor};
    let dev = CudaDevice::get(0)?;
    let up = |t: Option<&Tensor>| t.map(|t| CudaTensor::from_host(t, &dev)).transpose();
    let (q, k, v) =
        (CudaTensor::from_host(x.q, &dev)?, CudaTensor::from_host(x.k, &dev)?, CudaTensor::from_host(x.v, &dev)?);
    let (g, beta, h0) = (up(x.g)?, up(x.beta)?, up(x.initial_state)?);
    let inputs = Inputs {
        g: g.as_ref(),
        beta: beta.as_ref(),
        initial_state: h0.as_ref(),
        cu_seqlens: x.cu_seqlens,
        ..Inputs::new(&q, &k, &v)
    };
    let opts = Options { output_final_state: true, ..*opts };
    let (o, ht) = chunk::forward_cuda(family, &inputs, &opts)?;
    let ht = ht.ok_or_else(|| Error::Msg("chunk::forward_cuda returned no final state".into()))?;
    Ok((o.to_host()?, ht.to_host()?))
}
