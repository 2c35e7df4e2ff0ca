#!/usr/bin/env python3
"""The peer of `fla bench model --device cuda`: the same Qwen3.5-0.8B-shaped model (random bf16
weights; 24 layers, 18 Gated DeltaNet + 6 gated attention, hidden 1024, FFN 3584, vocab 248320)
in HF transformers on the same GPU, with FLA 0.6.0 on the path so that transformers runs FLA's
chunk / recurrent Gated DeltaNet kernels (attention through PyTorch SDPA). Prefill of one prompt
of --prompt-tokens (logits of the last token only, as ours), then --decode-tokens greedy steps
with the cache, each ending in the argmax on the host (as `fla generate`).

Run on the GPU machine by `scripts/gpu-run.sh hf [--prompt-tokens N]`; prints one JSON line per
row (`prefill`, `decode`) and which Gated DeltaNet kernels transformers picked.
"""
import argparse
import json
import statistics
import sys
import time


def config_kwargs():
    layer_types = ["full_attention" if (i + 1) % 4 == 0 else "linear_attention" for i in range(24)]
    return dict(
        vocab_size=248320, hidden_size=1024, intermediate_size=3584, num_hidden_layers=24,
        num_attention_heads=8, num_key_value_heads=2, head_dim=256, linear_num_key_heads=16,
        linear_num_value_heads=16, linear_key_head_dim=128, linear_value_head_dim=128,
        linear_conv_kernel_dim=4, rms_norm_eps=1e-6,
        rope_parameters={"rope_theta": 1e7, "partial_rotary_factor": 0.25, "rope_type": "default"},
        tie_word_embeddings=True, layer_types=layer_types, hidden_act="silu",
    )


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pylib", help="folder with FLA 0.6.0 unpacked (prepended to sys.path)")
    ap.add_argument("--prompt-tokens", type=int, default=8192)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5, help="timed prefills (after one warm-up)")
    args = ap.parse_args()
    if args.pylib:
        sys.path.insert(0, args.pylib)
    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = AutoConfig.for_model("qwen3_5_text", **config_kwargs())
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
    # Which Gated DeltaNet kernels the layer holds (the attribute names vary across versions).
    attn = next((m for m in model.modules() if type(m).__name__.endswith("GatedDeltaNet")), None)
    kernels = {
        name: f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__name__', '?')}"
        for name, fn in (vars(attn).items() if attn is not None else [])
        if callable(fn) and not isinstance(fn, torch.nn.Module)
    }
    print(json.dumps({"transformers": transformers.__version__, "torch": torch.__version__,
                      "gpu": torch.cuda.get_device_name(0), "kernels": kernels}), flush=True)
    prompt = (torch.arange(args.prompt_tokens, device="cuda") * 7919 % 248320).unsqueeze(0)

    def prefill():
        out = model(input_ids=prompt, use_cache=True, logits_to_keep=1)
        return out.past_key_values, int(out.logits[0, -1].argmax().item())

    with torch.inference_mode():
        prefill()
        times = []
        for _ in range(args.repeats):
            torch.cuda.synchronize()
            t = time.perf_counter()
            cache, nxt = prefill()
            times.append((time.perf_counter() - t) * 1e3)
        ms = statistics.median(times)
        print(json.dumps({"name": "prefill", "tokens": args.prompt_tokens, "ms": ms,
                          "tok_per_s": args.prompt_tokens / ms * 1e3}), flush=True)
        steps = []
        for _ in range(args.decode_tokens):
            t = time.perf_counter()
            out = model(input_ids=torch.tensor([[nxt]], device="cuda"), past_key_values=cache,
                        use_cache=True, logits_to_keep=1)
            cache, nxt = out.past_key_values, int(out.logits[0, -1].argmax().item())
            steps.append((time.perf_counter() - t) * 1e3)
        ms = statistics.median(steps)
        print(json.dumps({"name": "decode", "after": args.prompt_tokens, "ms": ms, "tok_per_s": 1e3 / ms}),
              flush=True)


if __name__ == "__main__":
    main()
