"""Benchmark NF4 (QLoRA) on the SmolLM2-135M shape: storage, quantize time, matmul speed, training-step memory.

Run: python bench/nf4.py [--reps 5]
Prints one JSON line:
- quantize_s: quantize_nf4_ on the whole model (210 linears, lm_head/embedding kept fp32);
- bits_per_param (double quantization) and bits_per_param_no_dq, over all quantized weights;
- model_mb: parameters + buffers in fp32, bf16 and NF4 (the tied fp32 embedding is 108 MB of the NF4 figure);
- step_s: median forward+backward (grad to the input only) of a 576 -> 1536 layer on 8 x 256 tokens, for a frozen
  fp32 nn.Linear and NF4Linear, eager and torch.compile'd;
- peak_rss_mb: one training step (batch 4 x 256, LoRA r 16 on all linears, chunked log-prob loss as in the
  scripts, AdamW) of QLoRA vs LoRA on fp32 weights, each in a fresh subprocess. The kernel's peak-RSS counter is
  reset after loading/quantizing (write "5" to /proc/self/clear_refs), so loading the fp32 checkpoint before
  quantizing does not count. The figure is the peak after the step (resident model + activations + the
  Python/torch runtime), read from VmHWM: getrusage's ru_maxrss is the same counter maxed with the peak recorded
  when any thread exited, which the reset cannot clear (threads that end during loading pin it at the load-time
  peak); both are reported.
"""
import argparse
import ctypes
import gc
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from nanoalign.fast import compile_pointwise  # noqa: E402
from nanoalign.logprobs import logprobs_chunked  # noqa: E402
from nanoalign.lora import apply_lora  # noqa: E402
from nanoalign.model import ModelConfig, Transformer  # noqa: E402
from nanoalign.nf4 import NF4Linear, quantize_nf4, quantize_nf4_  # noqa: E402

BATCH, SEQ = 4, 256


def bits_per_param(packed, state) -> float:
    """Storage cost, counted from the actual tensors (packed bytes plus all statistics)."""
    held = [packed] + [t for t in (state.absmax, state.absmax_scale, state.absmax_offset) if t is not None]
    return 8 * sum(t.numel() * t.element_size() for t in held) / state.shape.numel()


def model_bytes(model) -> int:
    """Bytes held by parameters and buffers, tied tensors counted once."""
    tensors = {t.data_ptr(): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def load_model():
    """The real SmolLM2-135M-Instruct if the hub can give it, else a random init of the same shape."""
    try:
        from nanoalign import hub
        return hub.load(hub.ALIAS)[0], hub.ALIAS
    except Exception:  # no cache and no network: same shapes, random weights
        return Transformer(ModelConfig()).init_weights(0), "random-init"


def _status_mb(key: str) -> float:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{key}:\s+(\d+)", f.read()).group(1)) / 1024  # kB -> MB


def rss_worker(kind: str) -> dict:
    """One training step of `kind` ("qlora" or "lora_fp32"); returns its peak RSS (and, for qlora, storage figures)."""
    model, weights = load_model()
    out = {"weights": weights}
    if kind == "qlora":
        out.update(quantize_stats(model))
    apply_lora(model, r=16, alpha=32)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, model.cfg.vocab_size, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # return freed load-time memory to the OS (same for both kinds)
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak-RSS counter: measure the step, not the load
    rss_before = _status_mb("VmRSS")
    t0 = time.perf_counter()
    hidden = model(ids[:, :-1], return_hidden=True)  # (B, T-1, C); the scripts never build (B, T, V) logits
    loss = -logprobs_chunked(hidden, model.lm_head.weight, ids[:, 1:]).mean()
    loss.backward()
    opt.step()
    step_s = time.perf_counter() - t0
    peak = _status_mb("VmHWM")
    ru_maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB -> MB
    return {**out, "peak_rss_mb": round(peak, 1), "rss_before_step_mb": round(rss_before, 1),
            "step_s": round(step_s, 2), "ru_maxrss_mb": round(ru_maxrss, 1)}


def quantize_stats(model) -> dict:
    """Quantize `model` in place; time it and count the storage."""
    w = model.model.layers[0].mlp.up_proj.weight
    no_dq = bits_per_param(*quantize_nf4(w, double_quant=False))  # the same for every layer
    fp32_bytes = model_bytes(model)
    t0 = time.perf_counter()
    quantize_nf4_(model)
    quantize_s = time.perf_counter() - t0
    layers = [m for m in model.modules() if isinstance(m, NF4Linear)]
    n = [m.in_features * m.out_features for m in layers]
    bits = sum(bits_per_param(m.weight_packed, m.state) * k for m, k in zip(layers, n)) / sum(n)
    return {"quantize_s": round(quantize_s, 2), "bits_per_param": round(bits, 4), "bits_per_param_no_dq": no_dq,
            "model_mb": {"fp32": round(fp32_bytes / 2**20, 1), "bf16": round(fp32_bytes / 2**21, 1),
                         "nf4": round(model_bytes(model) / 2**20, 1)}}


def time_fwd_bwd(layer: nn.Module, x: torch.Tensor, reps: int) -> float:
    g = torch.randn(*x.shape[:-1], layer.out_features)
    times = []
    for i in range(reps + 2):  # two warm-ups (the compiled path compiles forward, then backward)
        x.grad = None
        t0 = time.perf_counter()
        layer(x).backward(g)
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(reps: int):
    torch.set_num_threads(2)
    out = {"name": "nf4"}
    # 1. forward + backward of one 576 -> 1536 layer on 8 x 256 tokens
    torch.manual_seed(0)
    lin = nn.Linear(576, 1536, bias=False).requires_grad_(False)
    x = torch.randn(8, 256, 576, requires_grad=True)
    step = {"fp32_linear": time_fwd_bwd(lin, x, reps),
            "nf4_eager": time_fwd_bwd(NF4Linear(lin), x, reps),
            "nf4_compiled": time_fwd_bwd(compile_pointwise(NF4Linear(lin)), x, reps)}
    out["matmul_shape"], out["matmul_tokens"] = [576, 1536], 8 * 256
    out["step_s"] = {k: round(v, 4) for k, v in step.items()}

    # 2. one training step each of QLoRA and LoRA-fp32, each in its own process (the QLoRA one also measures
    #    quantize time and storage on the whole model)
    peaks = {}
    for kind in ("qlora", "lora_fp32"):
        r = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", kind],
                           capture_output=True, text=True, check=True)
        peaks[kind] = json.loads(r.stdout.strip().splitlines()[-1])
    out.update({k: peaks["qlora"][k] for k in ("weights", "quantize_s", "bits_per_param", "bits_per_param_no_dq",
                                                "model_mb")})
    out["train_batch"], out["train_seq"] = BATCH, SEQ
    out["peak_rss_mb"] = {k: v["peak_rss_mb"] for k, v in peaks.items()}
    out["rss_before_step_mb"] = {k: v["rss_before_step_mb"] for k, v in peaks.items()}
    out["ru_maxrss_mb"] = {k: v["ru_maxrss_mb"] for k, v in peaks.items()}
    out["train_step_s"] = {k: v["step_s"] for k, v in peaks.items()}
    out["ratio"] = {
        "nf4_compiled_vs_fp32_linear": round(step["nf4_compiled"] / step["fp32_linear"], 2),
        "nf4_eager_vs_fp32_linear": round(step["nf4_eager"] / step["fp32_linear"], 2),
        "qlora_vs_lora_fp32_peak_rss": round(peaks["qlora"]["peak_rss_mb"] / peaks["lora_fp32"]["peak_rss_mb"], 3),
    }
    out["targets_met"] = {"qlora_peak_rss_le_0.5x": out["ratio"]["qlora_vs_lora_fp32_peak_rss"] <= 0.5,
                          "nf4_compiled_le_2x_fp32": out["ratio"]["nf4_compiled_vs_fp32_linear"] <= 2.0}
    print(json.dumps(out))


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--worker", choices=["qlora", "lora_fp32"])
    args = ap.parse_args()
    if args.worker:
        torch.set_num_threads(2)
        print(json.dumps(rss_worker(args.worker)))
    else:
        main(args.reps)
