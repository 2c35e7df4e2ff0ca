//! Bad input is a typed error naming the argument, from every entry point (naive forward, chunk
//! forward and backward, recurrent step), and never a panic (DESIGN.md, "Errors").
mod common;

use std::panic::{catch_unwind, AssertUnwindSafe};

use common::{tensor, Data, DtBias, Spec};
use fla_core::{DType, Error, Tensor};
use fla_ops::{chunk, naive, recurrent, Family, Inputs, Options};

/// The error a case must produce.
#[derive(Debug, Clone, Copy)]
enum Want {
    Shape(&'static str),
    DType(&'static str),
    Size,
    CuSeqlens,
    Unsupported,
}

fn matches(e: &Error, want: Want) -> bool {
    match (e, want) {
        (Error::Shape { arg, .. }, Want::Shape(w)) => *arg == w,
        (Error::DType { arg, .. }, Want::DType(w)) => *arg == w,
        (Error::Size { .. }, Want::Size) => true,
        (Error::CuSeqlens { .. }, Want::CuSeqlens) => true,
        (Error::Unsupported { .. }, Want::Unsupported) => true,
        _ => false,
    }
}

/// Which entry points a case goes through.
#[derive(Clone, Copy)]
struct Forms {
    naive: bool,
    forward: bool,
    backward: bool,
    step: bool,
}

const ALL: Forms = Forms { naive: true, forward: true, backward: true, step: true };
/// Cases about `initial_state`, which the step takes as `state` instead.
const NOT_STEP: Forms = Forms { step: false, ..ALL };

fn base(family: Family) -> Spec {
    Spec::new(family, [2, 10, 2, 4, 8, 6]).h0(true)
}

fn packed(family: Family) -> Spec {
    Spec::new(family, [1, 10, 2, 4, 8, 6]).cu(&[0, 4, 10]).h0(true)
}

/// One entry point applied to the case.
type Run<'a> = Box<dyn Fn() -> fla_core::Result<()> + 'a>;

/// Runs `x` (built from `spec`, then broken) through `forms` and checks that each returns the
/// error `want`; a panic or success is a failure too.
fn expect(ctx: &str, spec: &Spec, x: &Data, opts: &Options, forms: Forms, want: Want) {
    let family = spec.family;
    let d_o = Tensor::zeros(&[spec.b, spec.t, spec.hv, spec.v], DType::F32);
    let mut runs: Vec<(&str, Run<'_>)> = Vec::new();
    if forms.naive {
        runs.push(("naive::forward", Box::new(|| naive::forward(family, &x.inputs(), opts).map(drop))));
    }
    if forms.forward {
        runs.push(("chunk::forward", Box::new(|| chunk::forward(family, &x.inputs(), opts).map(drop))));
    }
    if forms.backward {
        runs.push(("chunk::backward", Box::new(|| chunk::backward(family, &x.inputs(), opts, &d_o, None).map(drop))));
    }
    if forms.step {
        runs.push((
            "recurrent::step",
            Box::new(|| {
                let mut state =
                    x.h0.clone().unwrap_or_else(|| Tensor::zeros(&[spec.n(), spec.hv, spec.k, spec.v], DType::F32));
                let inputs = Inputs { initial_state: None, ..x.inputs() };
                recurrent::step(family, &inputs, opts, &mut state).map(drop)
            }),
        ));
    }
    for (name, run) in runs {
        match catch_unwind(AssertUnwindSafe(run)) {
            Err(_) => panic!("{ctx}: {name} panicked"),
            Ok(Ok(())) => panic!("{ctx}: {name} accepted the input, expected {want:?}"),
            Ok(Err(e)) => {
                assert!(matches(&e, want), "{ctx}: {name} returned `{e}` ({e:?}), expected {want:?}");
                if let Want::Shape(arg) | Want::DType(arg) = want {
                    assert!(e.to_string().contains(&format!("`{arg}`")), "{ctx}: message `{e}` does not name `{arg}`");
                }
            }
        }
    }
}

fn f32_data(spec: &Spec) -> Data {
    spec.data().cast(DType::F32)
}

fn zeros(shape: &[usize]) -> Tensor {
    Tensor::zeros(shape, DType::F32)
}

#[test]
fn valid_base_cases_pass() {
    // The cases below are these, each broken in one place: they must be accepted as they are.
    for spec in [base(Family::GatedDeltaRule), packed(Family::GatedDeltaRule)] {
        let x = f32_data(&spec);
        let opts = spec.opts();
        naive::forward(spec.family, &x.inputs(), &opts).unwrap();
        chunk::forward(spec.family, &x.inputs(), &opts).unwrap();
        let d_o = zeros(&[spec.b, spec.t, spec.hv, spec.v]);
        chunk::backward(spec.family, &x.inputs(), &opts, &d_o, None).unwrap();
    }
}

#[test]
fn shape_errors_name_the_argument() {
    let spec = base(Family::GatedDeltaRule);
    let opts = spec.opts();
    let x = f32_data(&spec);
    let mut y = x.clone();
    y.k = zeros(&[2, 10, 2, 9]);
    expect("k with K+1", &spec, &y, &opts, ALL, Want::Shape("k"));
    let mut y = x.clone();
    y.k = zeros(&[2, 10, 1, 8]);
    expect("k with other H", &spec, &y, &opts, ALL, Want::Shape("k"));
    let mut y = x.clone();
    y.q = zeros(&[2, 10, 16]);
    expect("q of rank 3", &spec, &y, &opts, ALL, Want::Shape("q"));
    let mut y = x.clone();
    y.v = zeros(&[2, 11, 4, 6]);
    expect("v with other T", &spec, &y, &opts, ALL, Want::Shape("v"));
    let mut y = x.clone();
    y.v = zeros(&[1, 10, 4, 6]);
    expect("v with other B", &spec, &y, &opts, ALL, Want::Shape("v"));
    let mut y = x.clone();
    y.v = zeros(&[2, 10, 24]);
    expect("v of rank 3", &spec, &y, &opts, ALL, Want::Shape("v"));
    let mut y = x.clone();
    y.beta = Some(zeros(&[2, 10, 2]));
    expect("beta with H heads", &spec, &y, &opts, ALL, Want::Shape("beta"));
    let mut y = x.clone();
    y.g = Some(zeros(&[2, 10, 4, 8]));
    expect("gdn g per channel", &spec, &y, &opts, ALL, Want::Shape("g"));

    let kda = base(Family::Kda);
    let mut y = f32_data(&kda);
    y.g = Some(zeros(&[2, 10, 4]));
    expect("kda g of rank 3", &kda, &y, &kda.opts(), ALL, Want::Shape("g"));

    let gdn2 = base(Family::Gdn2);
    let x2 = f32_data(&gdn2);
    let mut y = x2.clone();
    y.b = Some(zeros(&[2, 10, 4, 6]));
    expect("gdn2 b over V", &gdn2, &y, &gdn2.opts(), ALL, Want::Shape("b"));
    let mut y = x2.clone();
    y.w = Some(zeros(&[2, 10, 4, 8]));
    expect("gdn2 w over K", &gdn2, &y, &gdn2.opts(), ALL, Want::Shape("w"));
}

#[test]
fn size_errors() {
    // HV = 3 is not a multiple of H = 2.
    let spec = base(Family::GatedDeltaRule);
    let mut y = f32_data(&spec);
    y.v = zeros(&[2, 10, 3, 6]);
    y.g = Some(zeros(&[2, 10, 3]));
    y.beta = Some(zeros(&[2, 10, 3]));
    y.h0 = Some(zeros(&[2, 3, 8, 6]));
    expect("HV=3, H=2", &spec, &y, &spec.opts(), ALL, Want::Size);
    // K = 0.
    let mut y = f32_data(&spec);
    y.q = zeros(&[2, 10, 2, 0]);
    y.k = zeros(&[2, 10, 2, 0]);
    y.h0 = None;
    expect("K=0", &spec, &y, &spec.opts(), ALL, Want::Size);
}

#[test]
fn cu_seqlens_errors() {
    let spec = packed(Family::GatedDeltaRule);
    let opts = spec.opts();
    let x = f32_data(&spec);
    for (what, cu) in [
        ("not starting at 0", vec![1, 4, 10]),
        ("not ending at T", vec![0, 4, 9]),
        ("past T", vec![0, 4, 11]),
        ("decreasing", vec![0, 6, 4, 10]),
        ("a single offset", vec![0]),
        ("empty", vec![]),
    ] {
        let mut y = x.clone();
        // One initial state per sequence where that is well defined, so only cu_seqlens is wrong.
        let n = cu.len().saturating_sub(1).max(1);
        y.h0 = Some(zeros(&[n, 4, 8, 6]));
        y.cu_seqlens = Some(cu.clone());
        let ctx = format!("cu_seqlens {what} {cu:?}");
        // The step's state is y.h0, so its N matches whatever the offsets name.
        expect(&ctx, &spec, &y, &opts, ALL, Want::CuSeqlens);
    }
    // A packed batch needs B = 1.
    let spec2 = base(Family::GatedDeltaRule);
    let mut y = f32_data(&spec2);
    y.cu_seqlens = Some(vec![0, 4, 10]);
    expect("cu_seqlens with B=2", &spec2, &y, &opts, ALL, Want::CuSeqlens);
    // The checker itself.
    assert!(fla_ops::check_cu_seqlens("t", &[0, 3, 3, 7], 7).is_ok());
    assert_eq!(fla_ops::check_cu_seqlens("t", &[0, 3, 3, 7], 7).unwrap(), vec![0..3, 3..3, 3..7]);
    assert!(matches!(fla_ops::check_cu_seqlens("t", &[0, 8], 7), Err(Error::CuSeqlens { .. })));
}

#[test]
fn state_errors() {
    let spec = base(Family::GatedDeltaRule);
    let opts = spec.opts();
    let x = f32_data(&spec);
    let mut y = x.clone();
    y.h0 = Some(zeros(&[2, 4, 6, 8]));
    expect("initial_state [N,HV,V,K]", &spec, &y, &opts, NOT_STEP, Want::Shape("initial_state"));
    let mut y = x.clone();
    y.h0 = Some(zeros(&[1, 4, 8, 6]));
    expect("initial_state with N=1 for B=2", &spec, &y, &opts, NOT_STEP, Want::Shape("initial_state"));
    let p = packed(Family::GatedDeltaRule);
    let mut y = f32_data(&p);
    y.h0 = Some(zeros(&[1, 4, 8, 6]));
    expect("initial_state with N=1 for 2 packed sequences", &p, &y, &p.opts(), NOT_STEP, Want::Shape("initial_state"));
    let mut y = x.clone();
    y.h0 = Some(y.h0.unwrap().to_dtype(DType::BF16).unwrap());
    expect("initial_state in bf16", &spec, &y, &opts, NOT_STEP, Want::DType("initial_state"));

    // The recurrent step's state.
    let step = |state: &mut Tensor, with_h0: bool| {
        let inputs = Inputs { initial_state: if with_h0 { x.h0.as_ref() } else { None }, ..x.inputs() };
        catch_unwind(AssertUnwindSafe(|| recurrent::step(spec.family, &inputs, &opts, state)))
            .expect("recurrent::step panicked")
    };
    let check = |ctx: &str, r: fla_core::Result<Tensor>, want: Want| match r {
        Ok(_) => panic!("{ctx}: accepted"),
        Err(e) => assert!(matches(&e, want), "{ctx}: got `{e}`, expected {want:?}"),
    };
    check("state [N,HV,V,K]", step(&mut zeros(&[2, 4, 6, 8]), false), Want::Shape("state"));
    check("state without N", step(&mut zeros(&[4, 8, 6]), false), Want::Shape("state"));
    check("state in f64", step(&mut Tensor::zeros(&[2, 4, 8, 6], DType::F64), false), Want::DType("state"));
    check("state in bf16", step(&mut Tensor::zeros(&[2, 4, 8, 6], DType::BF16), false), Want::DType("state"));
    check("initial_state given to the step", step(&mut zeros(&[2, 4, 8, 6]), true), Want::Unsupported);
    // A rejected call leaves the state untouched.
    let mut state = Tensor::from_vec(vec![1.5f32; 2 * 4 * 8 * 6], &[2, 4, 8, 6]).unwrap();
    let mut y = x.clone();
    y.k = zeros(&[2, 10, 2, 9]);
    let inputs = Inputs { initial_state: None, ..y.inputs() };
    assert!(recurrent::step(spec.family, &inputs, &opts, &mut state).is_err());
    assert!(state.to_vec::<f32>().unwrap().iter().all(|&v| v == 1.5));
}

#[test]
fn dtype_errors_name_the_argument() {
    let spec = base(Family::GatedDeltaRule);
    let opts = spec.opts();
    let x = f32_data(&spec);
    let to = |t: &Tensor, d| t.to_dtype(d).unwrap();
    let mut y = x.clone();
    y.k = to(&y.k, DType::BF16);
    expect("k bf16, q f32", &spec, &y, &opts, ALL, Want::DType("k"));
    let mut y = x.clone();
    y.k = to(&y.k, DType::F64);
    expect("k f64, q f32", &spec, &y, &opts, ALL, Want::DType("k"));
    let mut y = x.clone();
    y.v = to(&y.v, DType::F16);
    expect("v f16, q f32", &spec, &y, &opts, ALL, Want::DType("v"));
    let mut y = x.clone();
    y.g = Some(to(y.g.as_ref().unwrap(), DType::BF16));
    expect("g bf16, q f32", &spec, &y, &opts, ALL, Want::DType("g"));
    let mut y = x.cast(DType::BF16);
    y.beta = Some(to(y.beta.as_ref().unwrap(), DType::F32));
    expect("beta f32, q bf16", &spec, &y, &opts, ALL, Want::DType("beta"));
    let gdn2 = base(Family::Gdn2);
    let mut y = f32_data(&gdn2);
    y.w = Some(to(y.w.as_ref().unwrap(), DType::BF16));
    expect("gdn2 w bf16", &gdn2, &y, &gdn2.opts(), ALL, Want::DType("w"));
}

#[test]
fn inputs_the_family_does_not_take_or_needs() {
    let gdn = base(Family::GatedDeltaRule);
    let mut y = f32_data(&gdn);
    y.beta = None;
    expect("gdn without beta", &gdn, &y, &gdn.opts(), ALL, Want::Unsupported);
    let mut y = f32_data(&gdn);
    y.g = None;
    expect("gdn without g", &gdn, &y, &gdn.opts(), ALL, Want::Unsupported);

    let gla = base(Family::Gla);
    let mut y = f32_data(&gla);
    y.beta = Some(zeros(&[2, 10, 4]));
    expect("gla with beta", &gla, &y, &gla.opts(), ALL, Want::Unsupported);

    let delta = base(Family::DeltaRule);
    let mut y = f32_data(&delta);
    y.g = Some(zeros(&[2, 10, 4]));
    expect("delta with g", &delta, &y, &delta.opts(), ALL, Want::Unsupported);

    let lin = base(Family::LinearAttn);
    let mut y = f32_data(&lin);
    y.beta = Some(zeros(&[2, 10, 4]));
    expect("linear_attn with beta", &lin, &y, &lin.opts(), ALL, Want::Unsupported);

    let kda = base(Family::Kda);
    let mut y = f32_data(&kda);
    y.g = None;
    expect("kda without g", &kda, &y, &kda.opts(), ALL, Want::Unsupported);
    let mut y = f32_data(&kda);
    y.w = Some(zeros(&[2, 10, 4, 6]));
    expect("kda with w", &kda, &y, &kda.opts(), ALL, Want::Unsupported);

    let gdn2 = base(Family::Gdn2);
    let mut y = f32_data(&gdn2);
    y.b = None;
    expect("gdn2 without b", &gdn2, &y, &gdn2.opts(), ALL, Want::Unsupported);
    let mut y = f32_data(&gdn2);
    y.w = None;
    expect("gdn2 without w", &gdn2, &y, &gdn2.opts(), ALL, Want::Unsupported);
    let mut y = f32_data(&gdn2);
    y.beta = Some(zeros(&[2, 10, 4]));
    expect("gdn2 with beta", &gdn2, &y, &gdn2.opts(), ALL, Want::Unsupported);
}

#[test]
fn backward_upstream_gradient_errors() {
    let spec = base(Family::Kda);
    let opts = spec.opts();
    let x = f32_data(&spec);
    let bad_do = zeros(&[2, 10, 4, 7]);
    let ok_do = zeros(&[2, 10, 4, 6]);
    let run = |d_o: &Tensor, dht: Option<&Tensor>| {
        catch_unwind(AssertUnwindSafe(|| chunk::backward(spec.family, &x.inputs(), &opts, d_o, dht)))
            .expect("chunk::backward panicked")
    };
    match run(&bad_do, None) {
        Err(Error::Shape { arg: "do", .. }) => {}
        other => panic!("do [B,T,HV,V+1]: {other:?}"),
    }
    match run(&zeros(&[2, 10, 24]), None) {
        Err(Error::Shape { arg: "do", .. }) => {}
        other => panic!("do of rank 3: {other:?}"),
    }
    match run(&ok_do, Some(&zeros(&[2, 4, 6, 8]))) {
        Err(Error::Shape { arg: "dht", .. }) => {}
        other => panic!("dht [N,HV,V,K]: {other:?}"),
    }
    assert!(run(&ok_do, Some(&zeros(&[2, 4, 8, 6]))).is_ok());
}

#[test]
fn gate_in_kernel_errors() {
    let gdn = base(Family::GatedDeltaRule).gate_in_kernel(DtBias::Head);
    let opts = gdn.opts();
    let x = f32_data(&gdn);
    let mut y = x.clone();
    y.a_log = None;
    expect("without A_log", &gdn, &y, &opts, ALL, Want::Unsupported);
    let mut y = x.clone();
    y.dt_bias = None;
    expect("without dt_bias", &gdn, &y, &opts, ALL, Want::Unsupported);
    let mut y = x.clone();
    y.dt_bias = Some(zeros(&[5]));
    expect("dt_bias [HV+1]", &gdn, &y, &opts, ALL, Want::Shape("dt_bias"));
    let mut y = x.clone();
    y.dt_bias = Some(zeros(&[4 * 8]));
    expect("gdn dt_bias [HV*K]", &gdn, &y, &opts, ALL, Want::Shape("dt_bias"));
    let mut y = x.clone();
    y.a_log = Some(zeros(&[3]));
    expect("A_log [HV-1]", &gdn, &y, &opts, ALL, Want::Shape("A_log"));
    let mut y = x.clone();
    y.a_log = Some(zeros(&[1, 4]));
    expect("A_log [1,HV]", &gdn, &y, &opts, ALL, Want::Shape("A_log"));
    // A_log / dt_bias without the option.
    let plain = Options { use_gate_in_kernel: false, ..opts };
    expect("A_log without use_gate_in_kernel", &gdn, &x, &plain, ALL, Want::Unsupported);

    let kda = base(Family::Kda).gate_in_kernel(DtBias::Flat);
    let mut y = f32_data(&kda);
    y.dt_bias = Some(zeros(&[4]));
    expect("kda dt_bias [HV]", &kda, &y, &kda.opts(), ALL, Want::Shape("dt_bias"));
    let mut y = f32_data(&kda);
    y.dt_bias = Some(zeros(&[4 * 8 + 1]));
    expect("kda dt_bias [HV*K+1]", &kda, &y, &kda.opts(), ALL, Want::Shape("dt_bias"));

    // A family without decay has no gate to compute.
    let delta = base(Family::DeltaRule);
    let mut y = f32_data(&delta);
    y.a_log = Some(zeros(&[4]));
    y.dt_bias = Some(zeros(&[4]));
    let opts = Options { use_gate_in_kernel: true, ..delta.opts() };
    expect("delta with use_gate_in_kernel", &delta, &y, &opts, ALL, Want::Unsupported);
}

#[test]
fn non_finite_scale_is_rejected() {
    let spec = base(Family::Gla);
    let x = f32_data(&spec);
    for scale in [f64::NAN, f64::INFINITY] {
        let opts = Options { scale: Some(scale), ..spec.opts() };
        expect(&format!("scale {scale}"), &spec, &x, &opts, ALL, Want::Unsupported);
    }
}

/// `Tensor` constructors used by the tests reject mismatched data (sanity of the helpers).
#[test]
fn from_vec_checks_its_size() {
    assert!(matches!(Tensor::from_vec(vec![0.0f32; 5], &[2, 3]), Err(Error::Shape { arg: "data", .. })));
    assert_eq!(tensor(vec![1.0; 6], &[2, 3]).shape(), [2, 3]);
}
