"""The GPU checks of the performance issue, as one short script (run it once on a lent CUDA machine).

Run: python bench/gpu.py [--device cuda] [--steps 5] [--init smollm2-135m-instruct]
     python bench/gpu.py --device cpu --init tiny --steps 1     (a smoke run of the same code on the CPU)
One JSON line per check:
    model      SmolLM2 forward under bf16 autocast: the blocks' matmuls run in bf16, the log-probs come out fp32
               (and their max abs difference from the fp32 forward's is reported)
    logprobs   the chunked log-prob loop, eager and torch.compile'd, equals the naive one on the device (values
               and hidden/weight gradients, fp32), with each path's peak device memory
    nf4        NF4Linear on the device: its output equals x @ dequantize(W).T, eager and compiled
    dpo        the LoRA-DPO step of bench/train_step.py (4 pairs x (64+64) as shared-prompt rows, reference every
               step) in bf16 autocast: step_s, tokens_per_s, and MFU against a bf16 torch.mm peak measured now
               (and against the H200's 989 TFLOP/s dense bf16 spec, when the device is an H200), peak memory
"""
import argparse
import json
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from nanoalign.fast import compile_pointwise  # noqa: E402
from nanoalign.hub import load  # noqa: E402
from nanoalign.logprobs import logprobs_chunked, logprobs_naive, token_logprobs  # noqa: E402
from nanoalign.nf4 import NF4Linear  # noqa: E402
from train_step import worker  # noqa: E402  (bench/train_step.py)


def peak_mb(device) -> float:
    return torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None


def check_model(model, device) -> dict:
    ids = torch.randint(3, model.cfg.vocab_size, (4, 64), generator=torch.Generator().manual_seed(0)).to(device)
    seen = []  # the dtype a block's matmul produces under autocast
    hook = model.model.layers[0].mlp.down_proj.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    with torch.no_grad():
        ref = token_logprobs(model, ids)
        with torch.autocast(device.type, torch.bfloat16):
            lp = token_logprobs(model, ids)
    hook.remove()
    return {"check": "model", "matmul_dtype": str(seen[-1]), "logprobs_dtype": str(lp.dtype),
            "max_abs_diff_vs_fp32": float((lp - ref).abs().max()),
            "ok": seen[-1] == torch.bfloat16 and lp.dtype == torch.float32}


def check_logprobs(device) -> dict:
    g = torch.Generator().manual_seed(0)
    N, C, V = 2048, 576, 49152
    h0, w0 = torch.randn(N, C, generator=g) * 0.5, torch.randn(V, C, generator=g) * 0.05
    y, up = torch.randint(0, V, (N,), generator=g).to(device), torch.randn(N, generator=g).to(device)
    out = {}
    for name, fn in (("naive", logprobs_naive), ("chunked", logprobs_chunked),
                     ("compiled", lambda h, w, y: logprobs_chunked(h, w, y, compiled=True))):
        h, w = h0.to(device).requires_grad_(), w0.to(device).requires_grad_()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        lp = fn(h, w, y)
        (lp * up).sum().backward()
        out[name] = (lp.detach(), h.grad, w.grad, peak_mb(device))
    diffs = {k: max(float((a - b).abs().max()) for a, b in zip(out[k][:3], out["naive"][:3]))
             for k in ("chunked", "compiled")}
    mem = {k: v[3] and round(v[3], 1) for k, v in out.items()}
    return {"check": "logprobs", "max_abs_diff": diffs, "peak_mem_mb": mem,
            "ok": all(d < 1e-3 for d in diffs.values())}


def check_nf4(device) -> dict:
    lin = torch.nn.Linear(576, 1536, bias=False)
    x = torch.randn(64, 576).to(device)
    diffs = {}
    for compiled in (False, True):
        q = NF4Linear(lin).to(device)
        q = compile_pointwise(q) if compiled else q
        diffs["compiled" if compiled else "eager"] = float((q(x) - x @ q.dequantize().T).abs().max())
    return {"check": "nf4", "max_abs_diff": diffs, "ok": all(d < 1e-4 for d in diffs.values())}


def check_dpo(init: str, device, steps: int) -> dict:
    """bench/train_step.py's LoRA-DPO step, on the device under bf16 autocast; mfu is against a bf16 mm there."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    row = worker("dpo", 1, steps, init, device=str(device), bf16=True)
    row = {"check": "dpo", "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
           **{k: row[k] for k in ("step_s", "tokens_per_s", "flops_per_token", "mfu", "peak_gflops")}}
    if "H200" in row["device"]:
        row["mfu_vs_h200_spec"] = round(row["flops_per_token"] * row["tokens_per_s"] / 989e12, 4)
    if device.type == "cuda":
        row["peak_mem_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--init", default="smollm2-135m-instruct")
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()
    device = torch.device(args.device)
    model, _ = load(args.init, device=args.device)
    for row in (check_model(model.eval(), device), check_logprobs(device), check_nf4(device),
                check_dpo(args.init, device, args.steps)):
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
