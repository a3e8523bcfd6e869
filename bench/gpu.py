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
               (and against the H200's 989 TFLOP/s dense bf16 spec, when the device is an H200)
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import train_dpo  # noqa: E402
from nanoalign import loop  # noqa: E402
from nanoalign.hub import load  # noqa: E402
from nanoalign.logprobs import logprobs_chunked, logprobs_naive, token_logprobs  # noqa: E402
from nanoalign.lora import apply_lora, disable_adapter, lora_layers  # noqa: E402
from nanoalign.losses import preference_loss  # noqa: E402
from nanoalign.nf4 import NF4Linear  # noqa: E402
from nanoalign.prefs import collate_shared  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


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
        q = NF4Linear(lin, compile=compiled).to(device)
        diffs["compiled" if compiled else "eager"] = float((q(x) - x @ q.dequantize().T).abs().max())
    return {"check": "nf4", "max_abs_diff": diffs, "ok": all(d < 1e-4 for d in diffs.values())}


def check_dpo(init: str, device, steps: int) -> dict:
    model, _ = load(init, device=str(device))
    apply_lora(model, r=16, alpha=32.0)
    model.train()
    params = loop.trainable(model)
    opt = loop.make_optimizer(params, 1e-5)
    V, P, R = model.cfg.vocab_size, 64, 64
    g = torch.Generator().manual_seed(0)
    rand = [torch.randint(3, V, (P,), generator=g).tolist() for _ in range(12)]
    exs = [{"prompt": rand[3 * i], "chosen": rand[3 * i + 1], "rejected": rand[3 * i + 2],
            "chosen_mask": [1] * R, "rejected_mask": [1] * R} for i in range(4)]
    batch = collate_shared(exs, 0, P + R)
    cfg = train_dpo.Config(bf16=True)

    def step():
        logps, _ = train_dpo.sequence_logps(model, batch, cfg, str(device))
        with torch.no_grad(), disable_adapter(model):
            ref, _ = train_dpo.sequence_logps(model, batch, cfg, str(device))
        losses, _, _ = preference_loss(*logps.chunk(2), *ref.chunk(2), beta=0.1)
        losses.mean().backward()
        loop.clip_and_step(opt, params, 1e-5, 1.0)

    step()  # warmup
    step_s = statistics.median(timed(step, device) for _ in range(steps))
    n = 8192 if device.type == "cuda" else 2048
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    torch.mm(a, b)
    peak = 2 * n ** 3 / min(timed(lambda: torch.mm(a, b), device) for _ in range(5))
    n_body = sum(m.base.weight.numel() for m in lora_layers(model).values())
    n_lora = sum(m.lora_A.weight.numel() + m.lora_B.weight.numel() for m in lora_layers(model).values())
    c, T = model.cfg, batch["input_ids"].shape[1]
    processed, scored = int(batch["attention_mask"].sum()), 8 * R
    attn = 12 * c.num_hidden_layers * T * c.hidden_size
    flops = (processed * (6 * n_body + 6 * n_lora + attn + attn // 3)
             + scored * 6 * c.vocab_size * c.hidden_size)  # policy fwd+bwd and reference fwd (bench/train_step.py)
    row = {"check": "dpo", "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
           "step_s": round(step_s, 4), "tokens_per_s": round(8 * (P + R) / step_s, 1),
           "mfu_vs_measured_bf16_mm": round(flops / step_s / peak, 4), "measured_bf16_mm_tflops": round(peak / 1e12, 1)}
    if "H200" in row["device"]:
        row["mfu_vs_h200_spec"] = round(flops / step_s / 989e12, 4)
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
