#!/usr/bin/env python3
"""Side by side on one GPU: our `fla bench ops --device cuda` next to FLA 0.6.0 (Python, Triton).

What it does, in one run:
  1. runs `.device/fla bench ops --device cuda --json [--seconds S] [--only ...]` (our rows, one
     JSON object per line), unless --no-ours;
  2. imports FLA 0.6.0 (from --pylib, default .device/pylib) and times it with CUDA events on the
     same shapes and dtypes (bf16 inputs, f32 state): warm-up first (Triton compiles and
     autotunes on the first calls, which can take a minute), then the median per call of many
     batches of back-to-back calls (the same method as ours); decode rows rotate through state
     copies spanning 512 MiB, several times the L2:
       decode1/64/256   fused_recurrent_gated_delta_rule, T=1, h0 in, new final state out
                        (FLA 0.6.0 has no in-place / state-pool form for Gated DeltaNet)
       kda_decode       fused_recurrent_kda (public API), N=64, h0 in, new final state out
       kda_decode_pool  fused_recurrent_kda_fwd, N=64, state pool updated in place
                        (inplace_final_state=True, ssm_state_indices: the vLLM form)
       chunk_fwd[_long|_gva|_varlen]   chunk_gated_delta_rule forward, final state out
       delta_chunk_fwd  chunk_delta_rule forward (DeltaNet, no decay), final state out
       kda_chunk_fwd    chunk_kda forward, final state out
       gdn_fwd_bwd, kda_fwd_bwd        chunk_gated_delta_rule / chunk_kda forward + backward
                        (random cotangent) at B=8 T=2048 H=16 K=V=128; ours: chunk_fwd_bwd,
                        kda_chunk_fwd_bwd
       hbm_ceiling      a 1 GiB torch device-to-device copy next to ours (same machine check)
  3. measures FLA's GPU time without its Python launch cost (FLA's eager call rate is host-bound
     on the chunk rows: ~1.1 ms of Python per call), --gpu-method auto (default):
       graph       one call (decode rows: one call per state copy, the whole rotation; the
                   fwd_bwd cases: forward + backward) captured in a torch.cuda.CUDAGraph after
                   the eager warm-up (Triton has compiled and autotuned by then) and a warm-up on
                   a side stream; inputs are the same static tensors; graph.replay() timed back to
                   back like the eager calls (CUDA events, ~1 ms batches, median), divided by the
                   calls in the graph. Gaps between kernels inside the graph are counted.
       kernel-sum  fallback when capture fails (or an eager call synchronizes the host, checked
                   first with torch.cuda.set_sync_debug_mode("error")): the sum of the GPU
                   activity durations (kernels, memsets, copies) that torch.profiler records over
                   >= 20 calls, divided by the calls. Gaps between kernels are not counted.
     The varlen row passes FLA's chunk_indices precomputed (prepare_chunk_indices, outside the
     timing): computing them from a CUDA cu_seqlens syncs the host (repeat_interleave);
     FLA's @tensor_cache would also serve the eager warm-up's copy, this does not depend on it.
  4. prints the GPU, the versions and an aligned table last: case, shape, ours ms, our host ms
     per call (from our row's note), FLA call ms (eager, host-bound where FLA's Python is slower
     than its kernels), FLA host ms per call, FLA GPU ms, FLA GPU/ours (> 1: ours is faster),
     the method of the GPU number and a note; and writes the raw numbers as JSON lines to --out
     (default $OUT/side_by_side.jsonl when $OUT is set): fla_ms / fla_host_ms (eager),
     fla_gpu_ms, fla_gpu_method ("graph", "kernel-sum" or null), fla_gpu_note, fla_gpu_error,
     gpu_ratio, ours_host_ms.

On Hopper with Triton < 3.7.1, FLA 0.6.0 refuses the gated backward (its issue #640: wrong
results) in fla/ops/common/chunk_o.py:chunk_bwd_dqkwg; this script bypasses that guard by setting
the module global fla.ops.common.chunk_o.TRITON_ABOVE_3_7_1 = True, and says so next to the number.

Run (on the GPU machine, from the repository root, after `scripts/gpu-run.sh prepare` here):
  scripts/gpu-run.sh side [OUTDIR] [--seconds S] [--only decode,chunk_fwd,...]
or directly:
  python3 scripts/fla_side_by_side.py --fla-bin .device/fla --pylib .device/pylib [--seconds 1]
      [--only decode,kda_decode,chunk_fwd,gdn_fwd_bwd] [--no-ours] [--out FILE]
      [--gpu-method auto|graph|kernel-sum|none]
--only takes our row names (decode, decode1, decode64, decode256, kda_decode, chunk_fwd,
chunk_fwd_long, chunk_fwd_gva, chunk_fwd_varlen, delta_chunk_fwd) and the FLA-only cases
(kda_decode_pool, gdn_fwd_bwd, kda_fwd_bwd, fwd_bwd); hbm_ceiling always runs. A full run takes
a few minutes on a fresh machine, most of it Triton compiling and autotuning FLA's kernels.
"""
import argparse
import contextlib
import gc
import json
import os
import re
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
GUARD_NOTE = "FLA backward timed with the #640 guard bypassed"
ROTATE_BYTES = 512 << 20
VARLEN_CU = [0, 2048, 2048 + 8192, 2048 + 8192 + 512, 2048 + 8192 + 512 + 5632]


def case(key, ours, aliases, shape, form):
    """ours: (row name, shape prefix or None) to find our row, or None (no row of ours)."""
    names = set(aliases) | {key} | ({ours[0]} if ours else set())
    return {"case": key, "ours": ours, "aliases": names, "shape": shape, "form": form}


CASES = [
    case("decode1", ("decode", "N=1 "), ["decode"], "N=1 H=HV=32 K=V=128 T=1",
         "fused_recurrent_gated_delta_rule, h0 in, new ht out"),
    case("decode64", ("decode", "N=64 "), ["decode"], "N=64 H=HV=32 K=V=128 T=1",
         "fused_recurrent_gated_delta_rule, h0 in, new ht out"),
    case("decode256", ("decode", "N=256 "), ["decode"], "N=256 H=HV=32 K=V=128 T=1",
         "fused_recurrent_gated_delta_rule, h0 in, new ht out"),
    case("kda_decode", ("kda_decode", None), [], "N=64 H=HV=32 K=V=128 T=1",
         "fused_recurrent_kda, h0 in, new ht out"),
    case("kda_decode_pool", ("kda_decode", None), ["kda_decode"], "N=64 H=HV=32 K=V=128 T=1",
         "fused_recurrent_kda_fwd, state pool in place"),
    case("chunk_fwd", ("chunk_fwd", None), [], "B=8 T=2048 H=HV=16 K=V=128",
         "chunk_gated_delta_rule fwd, ht out"),
    case("chunk_fwd_long", ("chunk_fwd_long", None), [], "B=1 T=32768 H=HV=16 K=V=128",
         "chunk_gated_delta_rule fwd, ht out"),
    case("chunk_fwd_gva", ("chunk_fwd_gva", None), [], "B=8 T=2048 H=16 HV=32 K=V=128",
         "chunk_gated_delta_rule fwd, ht out (GVA)"),
    case("chunk_fwd_varlen", ("chunk_fwd_varlen", None), [], "B=1 T=16384 (4 seqs) H=HV=16",
         "chunk_gated_delta_rule fwd, cu_seqlens, ht out"),
    case("delta_chunk_fwd", ("delta_chunk_fwd", None), [], "B=8 T=2048 H=HV=16 K=V=128",
         "chunk_delta_rule fwd, ht out"),
    case("kda_chunk_fwd", ("kda_chunk_fwd", None), [], "B=8 T=2048 H=HV=16 K=V=128",
         "chunk_kda fwd, ht out"),
    case("gdn_fwd_bwd", ("chunk_fwd_bwd", None), ["fwd_bwd"], "B=8 T=2048 H=HV=16 K=V=128",
         "chunk_gated_delta_rule fwd+bwd"),
    case("kda_fwd_bwd", ("kda_chunk_fwd_bwd", None), ["fwd_bwd"], "B=8 T=2048 H=HV=16 K=V=128",
         "chunk_kda fwd+bwd (no #640 guard on this path in 0.6.0)"),
    case("hbm_ceiling", ("hbm_ceiling", None), [], "1 GiB copy", "torch copy_ (not FLA)"),
]


def known_names():
    return sorted(set().union(*(c["aliases"] for c in CASES)))


def selected(c, only):
    return c["case"] == "hbm_ceiling" or only is None or bool(c["aliases"] & only)


def parse_only(text):
    """`a,b,c` -> set of names; None for all. Exits on a name no case knows."""
    if text is None or not text.strip():
        return None
    names = {n.strip() for n in text.split(",") if n.strip()}
    unknown = sorted(names - set(known_names()))
    if unknown:
        sys.exit(f"--only: unknown name(s) {', '.join(unknown)}; known: {', '.join(known_names())}")
    return names


def parse_ours(stdout):
    """Our JSON lines -> list of row dicts (lines that are not JSON objects are skipped)."""
    rows = []
    for line in stdout.splitlines():
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and "name" in row and isinstance(row.get("ms"), (int, float)):
            rows.append(row)
    return rows


HOST_NOTE = re.compile(r"host ([0-9]+(?:\.[0-9]*)?) (ms|µs|us)/call")


def host_ms_of(row):
    """Our host ms per call from a row's note ("host 0.041 ms/call", "host 3.2 µs/call"), or None."""
    if not row:
        return None
    m = HOST_NOTE.search(str(row.get("note") or ""))
    if not m:
        return None
    return float(m.group(1)) / (1.0 if m.group(2) == "ms" else 1e3)


def short_error(e, limit=160):
    """`Type: first line of the message` (cut at `limit` characters)."""
    text = str(e).strip()
    first = text.splitlines()[0][:limit] if text else ""
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def find_ours(rows, c):
    """Our row for case c, or None."""
    if c["ours"] is None:
        return None
    name, prefix = c["ours"]
    for row in rows:
        if row.get("name") == name and (prefix is None or str(row.get("shape", "")).startswith(prefix)):
            return row
    return None


def first_existing(candidates):
    for p in candidates:
        if p and os.path.exists(p):
            return p
    return None


def run_ours(fla_bin, seconds, only_text):
    """(rows, error or None) from `fla bench ops --device cuda --json`."""
    cmd = [fla_bin, "bench", "ops", "--device", "cuda", "--json", "--seconds", str(seconds)]
    if only_text:
        cmd += ["--only", only_text]
    print("ours: " + " ".join(cmd), file=sys.stderr, flush=True)
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=300 + 30 * seconds)
    except (OSError, subprocess.TimeoutExpired) as e:
        return [], f"{type(e).__name__}: {e}"
    for line in p.stderr.splitlines():
        print("ours: " + line, file=sys.stderr)
    rows = parse_ours(p.stdout)
    if p.returncode != 0:
        last = p.stderr.strip().splitlines()
        return rows, f"exit code {p.returncode}" + (f": {last[-1]}" if last else "")
    return rows, None


def fmt_ms(ms):
    if ms is None:
        return "—"
    return f"{ms:.4f}" if ms < 1 else f"{ms:.3f}"


def fmt_ratio(fla_ms, ours_ms):
    if fla_ms is None or ours_ms is None or ours_ms <= 0:
        return "—"
    return f"{fla_ms / ours_ms:.2f}"


def table(results):
    """Aligned table lines for result dicts (keys case, shape, ours_ms, ours_host_ms, fla_ms,
    fla_host_ms, fla_gpu_ms, fla_gpu_method, note; missing ones print as "—")."""
    head = ["case", "shape", "ours ms", "ours host", "FLA call ms", "FLA host", "FLA GPU ms",
            "FLA GPU/ours", "method", "FLA form / note"]
    body = [[r["case"], r["shape"], fmt_ms(r.get("ours_ms")), fmt_ms(r.get("ours_host_ms")),
             fmt_ms(r.get("fla_ms")), fmt_ms(r.get("fla_host_ms")), fmt_ms(r.get("fla_gpu_ms")),
             fmt_ratio(r.get("fla_gpu_ms"), r.get("ours_ms")), r.get("fla_gpu_method") or "—",
             r.get("note", "")] for r in results]
    last = len(head) - 1
    widths = [max(len(x[i]) for x in [head] + body) for i in range(last)]
    lines = []
    for row in [head] + body:
        cells = [row[0].ljust(widths[0]), row[1].ljust(widths[1])]
        cells += [row[i].rjust(widths[i]) for i in range(2, last - 1)]
        cells += [row[last - 1].ljust(widths[last - 1])]
        lines.append("  ".join(cells + [row[last]]).rstrip())
    return lines


# ---------------------------------------------------------------------------------------------
# FLA side (torch / triton / fla are imported only here, after our binary has run).

def copies_for(state_bytes):
    """State copies to rotate through: their bytes span ROTATE_BYTES (as ours), 2 to 256."""
    return max(2, min(256, -(-ROTATE_BYTES // state_bytes)))


def time_gpu_ms(torch, seconds, fn):
    """Median ms per call of fn(i) (CUDA events around batches of back-to-back calls, about
    1 ms of GPU time each), and the median host ms per call spent submitting."""
    i = 0
    for _ in range(3):  # warm-up: Triton JIT-compiles and autotunes on the first calls
        fn(i)
        i += 1
    torch.cuda.synchronize()
    probe = 10
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(probe):
        fn(i)
        i += 1
    b.record()
    b.synchronize()
    per = max(a.elapsed_time(b) / probe, 1e-4)
    reps = max(1, min(1000, int(1.0 / per)))
    samples, host = [], []
    start = time.perf_counter()
    while len(samples) < 7 or (time.perf_counter() - start < seconds and len(samples) < 500):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        h = time.perf_counter()
        for _ in range(reps):
            fn(i)
            i += 1
        host.append((time.perf_counter() - h) * 1e3 / reps)
        b.record()
        b.synchronize()
        samples.append(a.elapsed_time(b) / reps)
    return statistics.median(samples), statistics.median(host)


def import_fla(pylib):
    if pylib:
        sys.path.insert(0, os.path.abspath(pylib))
    import torch
    import triton
    import fla
    from fla.ops.delta_rule import chunk_delta_rule
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule
    from fla.ops.kda import chunk_kda, fused_recurrent_kda
    from fla.ops.kda.fused_recurrent import fused_recurrent_kda_fwd
    from fla.ops.utils.index import prepare_chunk_indices
    return {
        "torch": torch, "triton": triton, "fla": fla,
        "chunk_gated_delta_rule": chunk_gated_delta_rule, "chunk_delta_rule": chunk_delta_rule,
        "fused_recurrent_gated_delta_rule": fused_recurrent_gated_delta_rule,
        "chunk_kda": chunk_kda, "fused_recurrent_kda": fused_recurrent_kda,
        "fused_recurrent_kda_fwd": fused_recurrent_kda_fwd,
        "prepare_chunk_indices": prepare_chunk_indices,
    }


def bypass_640_guard():
    """FLA 0.6.0, fla/ops/common/chunk_o.py, chunk_bwd_dqkwg():
         if g is not None and IS_NVIDIA_HOPPER and TRITON_ABOVE_3_4_0 and not TRITON_ABOVE_3_7_1:
             raise RuntimeError(... #640 ...)
    The function reads those module globals at call time, so setting chunk_o.TRITON_ABOVE_3_7_1
    to True lets the Triton kernel run. Unless FLA's TileLang backend takes the call (tilelang
    installed, with nvcc): then the guard is never reached. Returns the note for the table."""
    import fla.ops.common.chunk_o as chunk_o
    try:
        from fla.backends import TileLangBackend
        tilelang = TileLangBackend.is_available() and TileLangBackend().is_enabled()
    except Exception:  # noqa: BLE001 - only informative
        tilelang = False
    guarded = (getattr(chunk_o, "IS_NVIDIA_HOPPER", False) and getattr(chunk_o, "TRITON_ABOVE_3_4_0", False)
               and not getattr(chunk_o, "TRITON_ABOVE_3_7_1", True))
    if tilelang:
        return "FLA backward: dqkwg through FLA's TileLang backend (#640 guard not reached)"
    if guarded:
        chunk_o.TRITON_ABOVE_3_7_1 = True
        return GUARD_NOTE
    return ""


def device_activity_us(events, cuda_device_type):
    """(sum of durations in µs, count) of the GPU-side events (kernels, memsets, copies) of a
    torch.profiler event list: those whose device_type is `cuda_device_type`."""
    total, count = 0.0, 0
    for e in events:
        if getattr(e, "device_type", None) != cuda_device_type:
            continue
        tr = e.time_range
        total += max(0.0, tr.end - tr.start)
        count += 1
    return total, count


def host_sync_check(torch, fn):
    """Runs fn(0) once with torch.cuda.set_sync_debug_mode("error"): the message of the first
    host-synchronizing CUDA call it makes (.item(), a blocking copy, ...), or None. Such a call
    cannot be captured in a CUDA graph."""
    try:
        prev = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error")
    except Exception:  # noqa: BLE001 - no sync debug mode in this torch: let capture find out
        return None
    try:
        fn(0)
        return None
    except RuntimeError as e:
        if "synchroniz" not in str(e):
            raise
        return short_error(e)
    finally:
        torch.cuda.set_sync_debug_mode(prev)
        torch.cuda.synchronize()


class HostSync(RuntimeError):
    pass


class Fla:
    """One case is built as (fn, period, grad): fn(i) is one FLA call on static inputs (rotating
    through `period` state copies / pool slices by i), grad False runs it under inference_mode."""

    def __init__(self, m, seconds, gpu_method="auto"):
        self.m, self.seconds, self.gpu_method = m, seconds, gpu_method
        self.torch = m["torch"]
        self.dev = "cuda"
        self.gen = self.torch.Generator(device=self.dev)
        self.gen.manual_seed(1)

    def rand(self, shape, lo, hi, dtype=None, grad=False):
        torch = self.torch
        x = torch.rand(shape, device=self.dev, generator=self.gen, dtype=torch.float32) * (hi - lo) + lo
        x = x.to(dtype or torch.bfloat16)
        return x.requires_grad_() if grad else x

    def time(self, fn):
        return time_gpu_ms(self.torch, self.seconds, fn)

    def mode(self, grad):
        return contextlib.nullcontext() if grad else self.torch.inference_mode()

    def states(self, n, hv, d):
        return [self.rand((n, hv, d, d), -0.1, 0.1, self.torch.float32) for _ in range(copies_for(n * hv * d * d * 4))]

    # -- the cases: each returns (fn, period, grad) ------------------------------------------

    def decode(self, n, kda=False, h=32, d=128):
        hv = h
        q, k = self.rand((n, 1, h, d), -1, 1), self.rand((n, 1, h, d), -1, 1)
        v = self.rand((n, 1, hv, d), -1, 1)
        g = self.rand((n, 1, hv, d) if kda else (n, 1, hv), -0.2, -0.01)
        beta = self.rand((n, 1, hv), 0.1, 0.9)
        states = self.states(n, hv, d)
        op = self.m["fused_recurrent_kda" if kda else "fused_recurrent_gated_delta_rule"]

        def fn(i):
            # keyword arguments: fused_recurrent_gated_delta_rule's positional order is q, k, v, g, gk, gv, beta
            op(q=q, k=k, v=v, g=g, beta=beta, initial_state=states[i % len(states)],
               output_final_state=True, use_qk_l2norm_in_kernel=True)
        return fn, len(states), False

    def kda_decode_pool(self, n, h=32, d=128):
        torch = self.torch
        hv = h
        q, k = self.rand((n, 1, h, d), -1, 1), self.rand((n, 1, h, d), -1, 1)
        v = self.rand((n, 1, hv, d), -1, 1)
        g = self.rand((n, 1, hv, d), -0.2, -0.01)
        beta = self.rand((n, 1, hv), 0.1, 0.9)
        copies = copies_for(n * hv * d * d * 4)
        pool = self.rand((copies * n, hv, d, d), -0.1, 0.1, torch.float32)
        index = [torch.arange(j * n, (j + 1) * n, device=self.dev, dtype=torch.int32) for j in range(copies)]
        out = torch.empty_like(v)
        op = self.m["fused_recurrent_kda_fwd"]

        def fn(i):
            op(q=q, k=k, v=v, g=g, beta=beta, initial_state=pool, inplace_final_state=True,
               ssm_state_indices=index[i % copies], use_qk_l2norm_in_kernel=True, out=out)
        return fn, copies, False

    def chunk_fwd(self, b, t, h, hv, cu_seqlens=None, d=128, delta=False, kda=False):
        torch = self.torch
        q, k = self.rand((b, t, h, d), -1, 1), self.rand((b, t, h, d), -1, 1)
        v = self.rand((b, t, hv, d), -1, 1)
        gate = {} if delta else {"g": self.rand((b, t, hv, d) if kda else (b, t, hv), -0.2, -0.01)}
        beta = self.rand((b, t, hv), 0.1, 0.9)
        extra = {}
        if cu_seqlens:
            extra["cu_seqlens"] = torch.tensor(cu_seqlens, dtype=torch.long, device=self.dev)
            extra["cu_seqlens_cpu"] = torch.tensor(cu_seqlens, dtype=torch.long)
            if not delta:
                # chunk_gated_delta_rule takes them precomputed; from a CUDA cu_seqlens their
                # construction syncs the host (repeat_interleave reads the total on the host)
                extra["chunk_indices"] = self.m["prepare_chunk_indices"](extra["cu_seqlens"], 64)
        op = self.m["chunk_delta_rule" if delta else "chunk_kda" if kda else "chunk_gated_delta_rule"]

        def fn(i):
            op(q=q, k=k, v=v, beta=beta, output_final_state=True, use_qk_l2norm_in_kernel=True,
               **gate, **extra)
        return fn, 1, False

    def fwd_bwd(self, kda, b=8, t=2048, h=16, d=128):
        torch = self.torch
        q, k = self.rand((b, t, h, d), -1, 1, grad=True), self.rand((b, t, h, d), -1, 1, grad=True)
        v = self.rand((b, t, h, d), -1, 1, grad=True)
        g = self.rand((b, t, h, d) if kda else (b, t, h), -0.2, -0.01, grad=True)
        beta = self.rand((b, t, h), 0.1, 0.9, grad=True)
        do = self.rand((b, t, h, d), -1, 1)
        op = self.m["chunk_kda" if kda else "chunk_gated_delta_rule"]
        inputs = (q, k, v, g, beta)

        def fn(i):
            o, _ = op(q=q, k=k, v=v, g=g, beta=beta, use_qk_l2norm_in_kernel=True)
            torch.autograd.grad(o, inputs, do)
        return fn, 1, True

    def hbm_ceiling(self):
        torch = self.torch
        src = torch.empty(1 << 30, dtype=torch.uint8, device=self.dev).random_(generator=self.gen)
        dst = torch.empty_like(src)
        return (lambda i: dst.copy_(src)), 1, False

    def build(self, key):
        if key.startswith("decode"):
            return self.decode(int(key[len("decode"):]))
        return {
            "kda_decode": lambda: self.decode(64, kda=True),
            "kda_decode_pool": lambda: self.kda_decode_pool(64),
            "chunk_fwd": lambda: self.chunk_fwd(8, 2048, 16, 16),
            "chunk_fwd_long": lambda: self.chunk_fwd(1, 32768, 16, 16),
            "chunk_fwd_gva": lambda: self.chunk_fwd(8, 2048, 16, 32),
            "chunk_fwd_varlen": lambda: self.chunk_fwd(1, VARLEN_CU[-1], 16, 16, cu_seqlens=VARLEN_CU),
            "delta_chunk_fwd": lambda: self.chunk_fwd(8, 2048, 16, 16, delta=True),
            "kda_chunk_fwd": lambda: self.chunk_fwd(8, 2048, 16, 16, kda=True),
            "gdn_fwd_bwd": lambda: self.fwd_bwd(kda=False),
            "kda_fwd_bwd": lambda: self.fwd_bwd(kda=True),
            "hbm_ceiling": self.hbm_ceiling,
        }[key]()

    # -- FLA's GPU time without its Python ----------------------------------------------------

    def graph_ms(self, fn, period, grad):
        """(ms per call, note): `period` calls (one rotation) captured in one CUDA graph, replays
        timed back to back. Raises HostSync when an eager call synchronizes the host."""
        torch = self.torch
        with self.mode(grad):
            sync = host_sync_check(torch, fn)
        if sync:
            raise HostSync(f"an eager call syncs the host ({sync})")
        # warm-up on a side stream (as torch's docs ask before capturing autograd work); Triton
        # compiled and autotuned during the eager timing already
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), self.mode(grad):
            for i in range(max(period, 3)):
                fn(i)
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        graphs = [torch.cuda.CUDAGraph()]
        try:
            with self.mode(grad):
                with torch.cuda.graph(graphs[0]):
                    for i in range(period):
                        fn(i)
            torch.cuda.synchronize()
            ms, _host = time_gpu_ms(torch, self.seconds, lambda i: graphs[0].replay())
        finally:
            graphs.clear()  # frees the graph and its memory pool
            gc.collect()
            with contextlib.suppress(Exception):  # the caller reports the first error
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
        return ms / period, (f"{period} calls/graph" if period > 1 else "")

    def kernel_sum_ms(self, fn, period, grad, min_calls=20):
        """(ms per call, note): GPU activity durations summed over >= min_calls calls (whole
        rotations) recorded by torch.profiler, over the calls."""
        torch = self.torch
        from torch.autograd import DeviceType
        from torch.profiler import ProfilerActivity, profile
        n = period * max(1, -(-min_calls // period))
        with self.mode(grad):
            for i in range(min(period, 3)):
                fn(i)
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for i in range(n):
                    fn(i)
                torch.cuda.synchronize()
        us, count = device_activity_us(prof.events(), DeviceType.CUDA)
        if count == 0:
            raise RuntimeError("torch.profiler recorded no GPU activity (CUPTI unavailable?)")
        return us / 1e3 / n, (f"{count / n:.0f} GPU ops/call (kernels, memsets, copies) over {n} calls, "
                              "gaps not counted")

    def recover(self):
        """After a failed capture: back on the default stream (torch.cuda.graph's __exit__ does
        not leave its capture stream when capture_end raises), clear what is left; a broken
        context shows as an error."""
        gc.collect()
        try:
            self.torch.cuda.set_stream(self.torch.cuda.default_stream())
            self.torch.cuda.synchronize()
            self.torch.cuda.empty_cache()
        except Exception as e:  # noqa: BLE001 - reported by the caller's next step
            print(f"FLA: CUDA after the failed capture: {short_error(e)}", file=sys.stderr)

    def gpu_time(self, fn, period, grad):
        """{fla_gpu_ms, fla_gpu_method, fla_gpu_note, fla_gpu_error} by self.gpu_method: auto
        (graph, else kernel-sum), graph, kernel-sum or none. Never raises."""
        r = {"fla_gpu_ms": None, "fla_gpu_method": None, "fla_gpu_note": "", "fla_gpu_error": None}
        if self.gpu_method == "none":
            return r
        notes = []
        if self.gpu_method in ("auto", "graph"):
            try:
                r["fla_gpu_ms"], note = self.graph_ms(fn, period, grad)
                r["fla_gpu_method"], r["fla_gpu_note"] = "graph", note
                return r
            except Exception as e:  # noqa: BLE001 - fall back / report
                notes.append(f"graph failed: {short_error(e)}")
                print(f"FLA: CUDA graph failed: {short_error(e, 400)}", file=sys.stderr)
                if not isinstance(e, HostSync):
                    self.recover()
                if self.gpu_method == "graph":
                    r["fla_gpu_error"] = notes[0]
                    r["fla_gpu_note"] = notes[0]
                    return r
        try:
            r["fla_gpu_ms"], note = self.kernel_sum_ms(fn, period, grad)
            r["fla_gpu_method"] = "kernel-sum"
            notes.append(note)
        except Exception as e:  # noqa: BLE001 - one failing measurement must not stop the others
            msg = f"kernel-sum failed: {short_error(e)}"
            print(f"FLA: {msg}", file=sys.stderr)
            notes.append(msg)
            r["fla_gpu_error"] = "; ".join(notes)
        r["fla_gpu_note"] = "; ".join(notes)
        return r

    def run(self, key):
        """Dict of case `key`: fla_ms and fla_host_ms (eager calls; raises if they fail) and the
        gpu_time fields (which never raise)."""
        fn, period, grad = self.build(key)
        with self.mode(grad):
            ms, host = self.time(fn)
        r = {"fla_ms": ms, "fla_host_ms": host}
        # The copy ceiling is one torch kernel, GPU-bound when called eagerly; replaying it in a
        # graph read 0.78 ms against 0.51 ms eager on an H200 (2026-11-30), so it is not timed so.
        if key != "hbm_ceiling":
            r.update(self.gpu_time(fn, period, grad))
        return r


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.split("\n")[1:]))
    ap.add_argument("--fla-bin", default=None, help="our `fla` binary (default .device/fla)")
    ap.add_argument("--pylib", default=None, help="folder holding the unpacked FLA wheels (default .device/pylib)")
    ap.add_argument("--seconds", type=float, default=1.0, help="minimum seconds timing each row (both sides)")
    ap.add_argument("--only", default=None, help="comma-separated case / row names (see above)")
    ap.add_argument("--no-ours", action="store_true", help="time FLA alone (do not run our binary)")
    ap.add_argument("--out", default=None, help="JSON lines file (default $OUT/side_by_side.jsonl if $OUT is set)")
    ap.add_argument("--gpu-method", choices=["auto", "graph", "kernel-sum", "none"], default="auto",
                    help="how FLA's GPU time is measured: auto (CUDA graph, else profiler kernel sum), "
                         "graph, kernel-sum, or none (eager call time only)")
    args = ap.parse_args(argv)
    if not args.seconds > 0:
        ap.error("--seconds must be > 0")
    only = parse_only(args.only)
    cases = [c for c in CASES if selected(c, only)]
    out_path = args.out or (os.path.join(os.environ["OUT"], "side_by_side.jsonl") if os.environ.get("OUT") else None)

    # 1. ours, before this process touches the GPU.
    ours_rows, ours_error = [], "not run (--no-ours)"
    if not args.no_ours:
        fla_bin = args.fla_bin or first_existing([".device/fla", os.path.join(HERE, "fla"),
                                                  os.path.join(HERE, "..", ".device", "fla")])
        if fla_bin is None or not os.path.exists(fla_bin):
            ours_error = f"our binary not found ({args.fla_bin or '.device/fla'}): run scripts/gpu-run.sh prepare"
        else:
            # our row names of the selected cases (an FLA case name such as gdn_fwd_bwd maps
            # to our row chunk_fwd_bwd)
            ours_only = None if only is None else ",".join(
                sorted({c["ours"][0] for c in CASES if c["ours"] and selected(c, only)})
            )
            ours_rows, ours_error = run_ours(fla_bin, args.seconds, ours_only)
        if ours_error:
            print(f"ours: {ours_error}", file=sys.stderr)

    # 2. FLA.
    pylib = args.pylib or first_existing([".device/pylib", os.path.join(HERE, "pylib"),
                                          os.path.join(HERE, "..", ".device", "pylib")])
    meta = {"gpu": None, "torch": None, "triton": None, "fla": None, "fla_path": None,
            "ours_error": ours_error, "seconds": args.seconds, "gpu_method": args.gpu_method}
    fla_error, guard_note, bench = None, "", None
    try:
        m = import_fla(pylib)
        torch = m["torch"]
        meta.update(torch=torch.__version__, triton=m["triton"].__version__,
                    fla=getattr(m["fla"], "__version__", "?"), fla_path=os.path.dirname(m["fla"].__file__))
        if not torch.cuda.is_available():
            raise RuntimeError("torch sees no CUDA device")
        meta["gpu"] = torch.cuda.get_device_name(0)
        guard_note = bypass_640_guard()
        bench = Fla(m, args.seconds, args.gpu_method)
    except Exception as e:  # noqa: BLE001 - report and still print ours
        fla_error = f"FLA unavailable: {type(e).__name__}: {e} (pylib: {pylib}; install the wheels: " \
                    "scripts/gpu-run.sh side does it)"
        print(fla_error, file=sys.stderr)
    meta["fla_error"] = fla_error
    meta["backward_note"] = guard_note

    results = []
    for c in cases:
        row = find_ours(ours_rows, c)
        r = {"case": c["case"], "shape": c["shape"], "ours_ms": row["ms"] if row else None,
             "ours_host_ms": host_ms_of(row), "fla_ms": None, "fla_host_ms": None,
             "fla_gpu_ms": None, "fla_gpu_method": None, "fla_gpu_note": "", "fla_gpu_error": None,
             "fla_form": c["form"], "note": c["form"], "ours_row": row}
        if bench is not None:
            print(f"FLA: timing {c['case']} ({c['form']}) ...", file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            try:
                r.update(bench.run(c["case"]))
                if r["fla_gpu_note"]:
                    r["note"] += "; " + r["fla_gpu_note"]
                if c["case"].endswith("fwd_bwd") and not c["case"].startswith("kda") and guard_note:
                    r["note"] += "; " + guard_note
            except Exception as e:  # noqa: BLE001 - one failing case must not stop the others
                msg = short_error(e)
                r["error"] = msg
                r["note"] += "; FLA failed: " + msg
                print(f"FLA: {c['case']} failed: {msg}", file=sys.stderr)
            try:
                bench.torch.cuda.empty_cache()
            except Exception:  # noqa: BLE001 - a broken context shows in the next case's error
                pass
            print(f"FLA: {c['case']}: call {fmt_ms(r['fla_ms'])} ms (host {fmt_ms(r['fla_host_ms'])} ms), "
                  f"GPU {fmt_ms(r['fla_gpu_ms'])} ms ({r['fla_gpu_method'] or '—'}) "
                  f"({time.perf_counter() - t0:.0f} s with warm-up)", file=sys.stderr, flush=True)
        r["ratio"] = (r["fla_ms"] / r["ours_ms"]) if r["fla_ms"] and r["ours_ms"] else None
        r["gpu_ratio"] = (r["fla_gpu_ms"] / r["ours_ms"]) if r["fla_gpu_ms"] and r["ours_ms"] else None
        results.append(r)

    if out_path:
        try:
            os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
            with open(out_path, "w") as f:
                f.write(json.dumps({"meta": meta}) + "\n")
                for r in results:
                    f.write(json.dumps(r) + "\n")
            print(f"wrote {out_path}", file=sys.stderr)
        except OSError as e:
            print(f"could not write {out_path}: {e}", file=sys.stderr)

    print()
    print(f"GPU: {meta['gpu'] or '?'}; torch {meta['torch'] or '?'}, triton {meta['triton'] or '?'}, "
          f"FLA {meta['fla'] or '?'}" + (f" ({meta['fla_path']})" if meta["fla_path"] else ""))
    if ours_error:
        print(f"ours: {ours_error}")
    if fla_error:
        print(fla_error)
    if guard_note:
        print(f"note: {guard_note} (gdn_fwd_bwd; FLA issue #640: Triton < 3.7.1 on Hopper)")
    print("FLA call ms: FLA's eager call rate (host-bound where FLA's Python takes longer than its kernels; "
          "FLA host: Python ms per call). FLA GPU ms: graph = one call (decode: one per state copy) "
          "captured in a CUDA graph, replays back to back; kernel-sum = GPU kernel durations from "
          "torch.profiler, gaps between kernels not counted. FLA GPU/ours > 1: ours is faster. "
          "Decode rows rotate state copies over 512 MiB (HBM-bound).")
    for line in table(results):
        print(line)
    return 0 if (bench is not None or not args.no_ours) else 1


if __name__ == "__main__":
    sys.exit(main())
