//! The model on the GPU (`Model::to_cuda`) against the same model on the CPU and the HF
//! reference: Qwen3.5's tiny checkpoint (Gated DeltaNet and gated attention layers, dense MLPs),
//! logits of the reference prompts in f32 and bf16, and prefill then decode equal to one pass.
//! Skips cleanly without a GPU (CI).
mod common;

use common::{model_dir, reference, rel_err};
use fla_core::cuda::{self, CudaDevice};
use fla_core::DType;
use fla_models::Model;

fn gpu(test: &str) -> Option<std::sync::Arc<CudaDevice>> {
    if !cuda::is_available() || !fla_kernels::compiled() {
        eprintln!("{test}: skipped: no CUDA device or no kernels");
        return None;
    }
    Some(CudaDevice::get(0).expect("a device is present"))
}

#[test]
fn qwen3_5_logits_on_the_gpu() {
    let Some(dev) = gpu("qwen3_5_logits_on_the_gpu") else { return };
    let model = Model::load(&model_dir("qwen3_5_tiny")).unwrap();
    let r = reference("qwen3_5_tiny");
    let seqs: Vec<&[u32]> = r.input_ids.iter().map(|p| &p[..]).collect();
    for (dtype, tol) in [(DType::F32, 1e-4), (DType::BF16, 5e-2)] {
        let gpu_model = model.to_cuda(&dev, dtype).unwrap();
        let logits = gpu_model.forward_logits(&seqs).unwrap();
        let err = rel_err(&logits, &r.logits);
        assert!(err <= tol, "{dtype}: logits rel err {err:.2e} against the reference");
    }
    // Prefill all but the last token, then decode it: the last row equals the one-pass logits.
    let gpu_model = model.to_cuda(&dev, DType::F32).unwrap();
    let full = gpu_model.forward_logits(&seqs[..1]).unwrap();
    let p = seqs[0];
    let mut cache = gpu_model.new_cache(1);
    gpu_model.forward_hidden(&[&p[..p.len() - 1]], &mut cache).unwrap();
    let h = gpu_model.forward_hidden(&[&p[p.len() - 1..]], &mut cache).unwrap();
    let last = gpu_model.logits(&h).unwrap().to_host().unwrap().to_vec::<f32>().unwrap();
    let v = gpu_model.vocab();
    let err = rel_err(&last, &full[(p.len() - 1) * v..]);
    assert!(err <= 1e-4, "prefill + decode vs one pass: rel err {err:.2e}");
}
