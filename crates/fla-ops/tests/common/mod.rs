//! Shared helpers of the fla-ops integration tests: seeded random inputs (FLA's recipe), owned
//! tensor sets that lend an [`Inputs`], and comparisons that collect every failure of a sweep.
#![allow(dead_code)]

pub mod gpu;

use fla_core::{DType, Tensor};
use fla_ops::{Decay, Erase, Family, Grads, Inputs, Options, Write};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// How the log decay `g` is drawn.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Gate {
    /// `g = ln σ(z + 1)`, `z ~ N(0,1)`: mild decay (mean ≈ −0.4).
    Mild,
    /// `g ~ U[−20, 0]`: strong decay.
    Strong,
}

/// How `beta` (and GDN-2's `b`, `w`) are drawn.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Beta {
    /// `σ(z)`, in (0, 1) (raw `z` with `use_beta_sigmoid_in_kernel`).
    Random,
    /// Exactly 0 everywhere.
    Zero,
    /// Exactly 1 everywhere.
    One,
}

/// Shape of `dt_bias` with `use_gate_in_kernel`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DtBias {
    /// `[HV]` (head decay).
    Head,
    /// `[HV·K]` (channel decay, FLA's layout).
    Flat,
    /// `[HV, K]` (channel decay).
    Matrix,
}

/// One random test case: family, sizes and which inputs / options it uses.
#[derive(Clone, Debug)]
pub struct Spec {
    pub family: Family,
    pub b: usize,
    pub t: usize,
    pub h: usize,
    pub hv: usize,
    pub k: usize,
    pub v: usize,
    pub cu_seqlens: Option<Vec<usize>>,
    pub h0: bool,
    /// Whether to pass `g` at all (only simple GLA may omit it).
    pub with_g: bool,
    pub gate: Gate,
    pub beta: Beta,
    pub l2norm_in_kernel: bool,
    pub beta_sigmoid_in_kernel: bool,
    pub gate_in_kernel: Option<DtBias>,
    pub seed: u64,
}

impl Spec {
    /// A case with sizes `[B, T, H, HV, K, V]`, mild decay, random beta, no initial state.
    pub fn new(family: Family, [b, t, h, hv, k, v]: [usize; 6]) -> Self {
        Spec {
            family,
            b,
            t,
            h,
            hv,
            k,
            v,
            cu_seqlens: None,
            h0: false,
            with_g: family.decay() != Decay::None,
            gate: Gate::Mild,
            beta: Beta::Random,
            l2norm_in_kernel: false,
            beta_sigmoid_in_kernel: false,
            gate_in_kernel: None,
            seed: 42,
        }
    }
    pub fn cu(mut self, cu: &[usize]) -> Self {
        assert_eq!(self.b, 1, "cu_seqlens needs B = 1");
        assert_eq!(*cu.last().unwrap(), self.t);
        self.cu_seqlens = Some(cu.to_vec());
        self
    }
    pub fn h0(mut self, yes: bool) -> Self {
        self.h0 = yes;
        self
    }
    pub fn gate(mut self, gate: Gate) -> Self {
        self.gate = gate;
        self
    }
    pub fn beta(mut self, beta: Beta) -> Self {
        self.beta = beta;
        self
    }
    pub fn without_g(mut self) -> Self {
        assert!(self.family.gate_optional() || self.family.decay() == Decay::None);
        self.with_g = false;
        self
    }
    pub fn l2norm(mut self) -> Self {
        self.l2norm_in_kernel = true;
        self
    }
    pub fn sigmoid(mut self) -> Self {
        self.beta_sigmoid_in_kernel = true;
        self
    }
    pub fn gate_in_kernel(mut self, dt: DtBias) -> Self {
        self.gate_in_kernel = Some(dt);
        self
    }
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// Number of sequences (`B`, or `len(cu_seqlens) − 1`).
    pub fn n(&self) -> usize {
        self.cu_seqlens.as_ref().map_or(self.b, |c| c.len() - 1)
    }

    /// The options of this case, with `output_final_state`.
    pub fn opts(&self) -> Options {
        Options {
            scale: None,
            output_final_state: true,
            use_qk_l2norm_in_kernel: self.l2norm_in_kernel,
            use_beta_sigmoid_in_kernel: self.beta_sigmoid_in_kernel,
            use_gate_in_kernel: self.gate_in_kernel.is_some(),
        }
    }

    /// A short description for failure messages.
    pub fn label(&self) -> String {
        let mut s =
            format!("{} B={} T={} H={} HV={} K={} V={}", self.family, self.b, self.t, self.h, self.hv, self.k, self.v);
        if let Some(cu) = &self.cu_seqlens {
            s += &format!(" cu={cu:?}");
        }
        if self.h0 {
            s += " h0";
        }
        if self.family.decay() != Decay::None {
            if !self.with_g {
                s += " no-g";
            } else if self.gate == Gate::Strong {
                s += " strong-decay";
            }
        }
        if self.beta != Beta::Random {
            s += &format!(" beta={:?}", self.beta);
        }
        if self.l2norm_in_kernel {
            s += " l2norm";
        }
        if self.beta_sigmoid_in_kernel {
            s += " sigmoid";
        }
        if let Some(dt) = self.gate_in_kernel {
            s += &format!(" gate-in-kernel({dt:?})");
        }
        s
    }

    /// Random inputs in f64 (convert with [`Data::cast`]).
    pub fn data(&self) -> Data {
        let mut rng = StdRng::seed_from_u64(self.seed);
        let (b, t, h, hv, k, v, n) = (self.b, self.t, self.h, self.hv, self.k, self.v, self.n());
        let fam = self.family;
        let mut q = normal(&mut rng, b * t * h * k);
        let mut kk = normal(&mut rng, b * t * h * k);
        if !self.l2norm_in_kernel {
            l2_normalise(&mut q, k);
            l2_normalise(&mut kk, k);
        }
        let vv = normal(&mut rng, b * t * hv * v);
        let g = (fam.decay() != Decay::None && self.with_g).then(|| {
            let (len, shape) = match fam.decay() {
                Decay::Head => (b * t * hv, vec![b, t, hv]),
                _ => (b * t * hv * k, vec![b, t, hv, k]),
            };
            let data: Vec<f64> = (0..len)
                .map(|_| {
                    if self.gate_in_kernel.is_some() {
                        normal1(&mut rng)
                    } else {
                        match self.gate {
                            Gate::Mild => log_sigmoid(normal1(&mut rng) + 1.0),
                            Gate::Strong => -20.0 * rng.gen::<f64>(),
                        }
                    }
                })
                .collect();
            tensor(data, &shape)
        });
        let gatelike = |rng: &mut StdRng, len: usize, shape: &[usize]| {
            let data: Vec<f64> = (0..len)
                .map(|_| match self.beta {
                    Beta::Zero => 0.0,
                    Beta::One => 1.0,
                    Beta::Random if self.beta_sigmoid_in_kernel => normal1(rng),
                    Beta::Random => sigmoid(normal1(rng)),
                })
                .collect();
            tensor(data, shape)
        };
        let beta = (fam.erase() == Erase::Beta).then(|| gatelike(&mut rng, b * t * hv, &[b, t, hv]));
        let bg = (fam.erase() == Erase::Channel).then(|| gatelike(&mut rng, b * t * hv * k, &[b, t, hv, k]));
        let wg = (fam.write() == Write::Channel).then(|| gatelike(&mut rng, b * t * hv * v, &[b, t, hv, v]));
        let h0 = self.h0.then(|| tensor(normal(&mut rng, n * hv * k * v), &[n, hv, k, v]));
        let (a_log, dt_bias) = match self.gate_in_kernel {
            None => (None, None),
            Some(dt) => {
                let a_log: Vec<f64> = (0..hv).map(|_| (1.0 + 15.0 * rng.gen::<f64>()).ln()).collect();
                let shape = match dt {
                    DtBias::Head => vec![hv],
                    DtBias::Flat => vec![hv * k],
                    DtBias::Matrix => vec![hv, k],
                };
                let dt_len = shape.iter().product();
                let dt_bias = normal(&mut rng, dt_len).into_iter().map(|x| 0.5 * x).collect();
                (Some(tensor(a_log, &[hv])), Some(tensor(dt_bias, &shape)))
            }
        };
        Data {
            q: tensor(q, &[b, t, h, k]),
            k: tensor(kk, &[b, t, h, k]),
            v: tensor(vv, &[b, t, hv, v]),
            g,
            beta,
            b: bg,
            w: wg,
            h0,
            a_log,
            dt_bias,
            cu_seqlens: self.cu_seqlens.clone(),
        }
    }

    /// Upstream gradients `do [B,T,HV,V]` and `dht [N,HV,K,V]` in f64.
    pub fn upstream(&self) -> (Tensor, Tensor) {
        let mut rng = StdRng::seed_from_u64(self.seed ^ 0x9e37_79b9_7f4a_7c15);
        let d_o = normal(&mut rng, self.b * self.t * self.hv * self.v);
        let dht = normal(&mut rng, self.n() * self.hv * self.k * self.v);
        (tensor(d_o, &[self.b, self.t, self.hv, self.v]), tensor(dht, &[self.n(), self.hv, self.k, self.v]))
    }
}

/// Owned inputs of one call; [`Data::inputs`] lends them as [`Inputs`].
#[derive(Clone, Debug)]
pub struct Data {
    pub q: Tensor,
    pub k: Tensor,
    pub v: Tensor,
    pub g: Option<Tensor>,
    pub beta: Option<Tensor>,
    pub b: Option<Tensor>,
    pub w: Option<Tensor>,
    pub h0: Option<Tensor>,
    pub a_log: Option<Tensor>,
    pub dt_bias: Option<Tensor>,
    pub cu_seqlens: Option<Vec<usize>>,
}

impl Data {
    pub fn inputs(&self) -> Inputs<'_> {
        Inputs {
            q: &self.q,
            k: &self.k,
            v: &self.v,
            g: self.g.as_ref(),
            beta: self.beta.as_ref(),
            b: self.b.as_ref(),
            w: self.w.as_ref(),
            initial_state: self.h0.as_ref(),
            a_log: self.a_log.as_ref(),
            dt_bias: self.dt_bias.as_ref(),
            cu_seqlens: self.cu_seqlens.as_deref(),
        }
    }

    /// The activations (`q k v g beta b w`) in `dtype`; the state and the gate parameters in f64
    /// when `dtype` is f64, else f32.
    pub fn cast(&self, dtype: DType) -> Data {
        let wide = if dtype == DType::F64 { DType::F64 } else { DType::F32 };
        let c = |t: &Tensor, d: DType| t.to_dtype(d).unwrap();
        let co = |t: &Option<Tensor>, d: DType| t.as_ref().map(|t| c(t, d));
        Data {
            q: c(&self.q, dtype),
            k: c(&self.k, dtype),
            v: c(&self.v, dtype),
            g: co(&self.g, dtype),
            beta: co(&self.beta, dtype),
            b: co(&self.b, dtype),
            w: co(&self.w, dtype),
            h0: co(&self.h0, wide),
            a_log: co(&self.a_log, wide),
            dt_bias: co(&self.dt_bias, wide),
            cu_seqlens: self.cu_seqlens.clone(),
        }
    }

    /// Every tensor input that is present, by FLA name, with the name of its gradient.
    pub fn fields(&self) -> Vec<(&'static str, &Tensor)> {
        let mut out = vec![("q", &self.q), ("k", &self.k), ("v", &self.v)];
        for (name, t) in [
            ("g", &self.g),
            ("beta", &self.beta),
            ("b", &self.b),
            ("w", &self.w),
            ("h0", &self.h0),
            ("a_log", &self.a_log),
            ("dt_bias", &self.dt_bias),
        ] {
            if let Some(t) = t {
                out.push((name, t));
            }
        }
        out
    }

    /// The input named `name` (as in [`Data::fields`]).
    pub fn field_mut(&mut self, name: &str) -> &mut Tensor {
        match name {
            "q" => &mut self.q,
            "k" => &mut self.k,
            "v" => &mut self.v,
            "g" => self.g.as_mut().unwrap(),
            "beta" => self.beta.as_mut().unwrap(),
            "b" => self.b.as_mut().unwrap(),
            "w" => self.w.as_mut().unwrap(),
            "h0" => self.h0.as_mut().unwrap(),
            "a_log" => self.a_log.as_mut().unwrap(),
            "dt_bias" => self.dt_bias.as_mut().unwrap(),
            _ => panic!("no input {name}"),
        }
    }
}

/// The gradient of the input named `name` (as in [`Data::fields`]).
pub fn grad_of<'a>(g: &'a Grads, name: &str) -> Option<&'a Tensor> {
    match name {
        "q" => Some(&g.dq),
        "k" => Some(&g.dk),
        "v" => Some(&g.dv),
        "g" => g.dg.as_ref(),
        "beta" => g.dbeta.as_ref(),
        "b" => g.db.as_ref(),
        "w" => g.dw.as_ref(),
        "h0" => g.dh0.as_ref(),
        "a_log" => g.da_log.as_ref(),
        "dt_bias" => g.ddt_bias.as_ref(),
        _ => panic!("no input {name}"),
    }
}

/// Every gradient field by name, present or not.
pub fn all_grads(g: &Grads) -> Vec<(&'static str, Option<&Tensor>)> {
    vec![
        ("dq", Some(&g.dq)),
        ("dk", Some(&g.dk)),
        ("dv", Some(&g.dv)),
        ("dg", g.dg.as_ref()),
        ("dbeta", g.dbeta.as_ref()),
        ("db", g.db.as_ref()),
        ("dw", g.dw.as_ref()),
        ("dh0", g.dh0.as_ref()),
        ("da_log", g.da_log.as_ref()),
        ("ddt_bias", g.ddt_bias.as_ref()),
    ]
}

pub fn tensor(data: Vec<f64>, shape: &[usize]) -> Tensor {
    Tensor::from_vec(data, shape).unwrap()
}

pub fn normal1(rng: &mut StdRng) -> f64 {
    // Box–Muller.
    let u1: f64 = 1.0 - rng.gen::<f64>();
    let u2: f64 = rng.gen::<f64>();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

pub fn normal(rng: &mut StdRng, n: usize) -> Vec<f64> {
    (0..n).map(|_| normal1(rng)).collect()
}

pub fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

pub fn log_sigmoid(x: f64) -> f64 {
    -(1.0 + (-x).exp()).ln()
}

pub fn l2_normalise(x: &mut [f64], dim: usize) {
    for row in x.chunks_mut(dim) {
        let n = row.iter().map(|a| a * a).sum::<f64>().sqrt();
        row.iter_mut().for_each(|a| *a /= n);
    }
}

/// `Σ a·b` in f64.
pub fn dot(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.shape(), b.shape());
    let (a, b) = (a.to_vec::<f64>().unwrap(), b.to_vec::<f64>().unwrap());
    a.iter().zip(&b).map(|(x, y)| x * y).sum()
}

/// Collects the failures of a sweep so that one run reports all of them.
#[derive(Default)]
pub struct Checker {
    pub checks: usize,
    pub failures: Vec<String>,
}

impl Checker {
    /// `‖got − want‖ ≤ tol·max(‖want‖, 1e-2)`, same shape, reference finite (NaN fails). The
    /// floor only matters for references that are zero up to rounding (for example `dg` of a
    /// one-token sequence without initial state, where the decay never acts).
    pub fn close(&mut self, ctx: &str, name: &str, got: &Tensor, want: &Tensor, tol: f64) {
        self.checks += 1;
        if got.shape() != want.shape() {
            self.failures.push(format!("{ctx}: {name}: shape {:?}, reference {:?}", got.shape(), want.shape()));
            return;
        }
        let wv = want.to_vec::<f64>().unwrap();
        if wv.iter().any(|x| !x.is_finite()) {
            self.failures.push(format!("{ctx}: {name}: reference is not finite"));
            return;
        }
        let norm = want.norm().unwrap();
        let e = got.rel_err(want).unwrap();
        let abs = if norm > 0.0 { e * norm } else { e };
        if e.is_nan() || abs > tol * norm.max(1e-2) {
            self.failures.push(format!("{ctx}: {name}: rel err {e:.3e} > {tol:.0e} (‖ref‖ = {norm:.3e})"));
        }
    }

    /// Same check on two optional tensors: both present (and close) or both absent.
    pub fn close_opt(&mut self, ctx: &str, name: &str, got: Option<&Tensor>, want: Option<&Tensor>, tol: f64) {
        match (got, want) {
            (Some(g), Some(w)) => self.close(ctx, name, g, w, tol),
            (None, None) => {}
            (g, w) => {
                self.checks += 1;
                self.failures.push(format!(
                    "{ctx}: {name}: present {} vs reference present {}",
                    g.is_some(),
                    w.is_some()
                ))
            }
        }
    }

    /// Every gradient of `got` against `want`. `da_log` and `ddt_bias` get `10·tol`: each is a
    /// sum over the `B·T` tokens (and, for `da_log` of a per-channel gate, the `K` channels) of
    /// gate elements whose terms largely cancel, so it amplifies the (in-tolerance) rounding of
    /// `dg` by the condition number of that sum (KDA's 16-bit tensor-core `ddt_bias` reaches
    /// 2.9e-2 where its `dg` is within 6.5e-3).
    pub fn grads(&mut self, ctx: &str, got: &Grads, want: &Grads, tol: f64) {
        for ((name, g), (_, w)) in all_grads(got).into_iter().zip(all_grads(want)) {
            let tol = if matches!(name, "da_log" | "ddt_bias") { 10.0 * tol } else { tol };
            self.close_opt(ctx, name, g, w, tol);
        }
    }

    pub fn fail(&mut self, msg: String) {
        self.checks += 1;
        self.failures.push(msg);
    }

    /// Prints `summary` after the check and failure counts, and the first 30 failures, to stderr
    /// (the sweeps' one-line report), then [`Checker::finish`].
    pub fn report_and_finish(self, summary: &str, min_checks: usize) {
        eprintln!("{} checks, {} failures; {summary}", self.checks, self.failures.len());
        for f in self.failures.iter().take(30) {
            eprintln!("  {f}");
        }
        self.finish(min_checks);
    }

    /// Panics with every failure; also fails if fewer than `min_checks` checks ran.
    pub fn finish(self, min_checks: usize) {
        assert!(
            self.failures.is_empty(),
            "{} of {} checks failed:\n{}",
            self.failures.len(),
            self.checks,
            self.failures.join("\n")
        );
        assert!(self.checks >= min_checks, "only {} checks ran, expected at least {min_checks}", self.checks);
    }
}

/// Rows `[start, start + len)` of dimension 1 of a `[B, T, ...]` tensor, as a contiguous copy.
pub fn tokens(t: &Tensor, start: usize, len: usize) -> Tensor {
    t.narrow(1, start, len).unwrap().contiguous().unwrap()
}

/// Entries `[start, start + len)` of dimension `dim`, as a contiguous copy.
pub fn slice(t: &Tensor, dim: usize, start: usize, len: usize) -> Tensor {
    t.narrow(dim, start, len).unwrap().contiguous().unwrap()
}

/// Concatenation along dimension `dim` of tensors that agree elsewhere, in f64.
pub fn cat(parts: &[Tensor], dim: usize) -> Tensor {
    let first = parts[0].shape().to_vec();
    let outer: usize = first[..dim].iter().product();
    let inner: usize = first[dim + 1..].iter().product();
    let mut total = 0;
    let vecs: Vec<Vec<f64>> = parts
        .iter()
        .map(|p| {
            assert_eq!(p.shape()[..dim], first[..dim]);
            assert_eq!(p.shape()[dim + 1..], first[dim + 1..]);
            total += p.shape()[dim];
            p.to_vec::<f64>().unwrap()
        })
        .collect();
    let mut out = Vec::with_capacity(outer * total * inner);
    for o in 0..outer {
        for (p, v) in parts.iter().zip(&vecs) {
            let n = p.shape()[dim] * inner;
            out.extend_from_slice(&v[o * n..(o + 1) * n]);
        }
    }
    let mut shape = first;
    shape[dim] = total;
    tensor(out, &shape)
}

/// A `Data` restricted to tokens `[start, start + len)` of a non-packed batch (no initial state,
/// no cu_seqlens).
pub fn data_tokens(d: &Data, start: usize, len: usize) -> Data {
    let f = |t: &Option<Tensor>| t.as_ref().map(|t| tokens(t, start, len));
    Data {
        q: tokens(&d.q, start, len),
        k: tokens(&d.k, start, len),
        v: tokens(&d.v, start, len),
        g: f(&d.g),
        beta: f(&d.beta),
        b: f(&d.b),
        w: f(&d.w),
        h0: None,
        a_log: d.a_log.clone(),
        dt_bias: d.dt_bias.clone(),
        cu_seqlens: None,
    }
}

/// A `Data` restricted to batch row `i` of a non-packed batch (with its initial state).
pub fn data_row(d: &Data, i: usize) -> Data {
    let f = |t: &Option<Tensor>| t.as_ref().map(|t| slice(t, 0, i, 1));
    Data {
        q: slice(&d.q, 0, i, 1),
        k: slice(&d.k, 0, i, 1),
        v: slice(&d.v, 0, i, 1),
        g: f(&d.g),
        beta: f(&d.beta),
        b: f(&d.b),
        w: f(&d.w),
        h0: f(&d.h0),
        a_log: d.a_log.clone(),
        dt_bias: d.dt_bias.clone(),
        cu_seqlens: None,
    }
}
