"""Benchmark one optimizer step of SFT, DPO and the reward model on the standard workload.

Run: python bench/train_step.py [--algo sft|dpo|rm|all] [--warmup 2] [--steps 5] [--init tiny (a quick check)]
                                [--compile] [--share-prompt 0]
Workload: SmolLM2-135M-Instruct (hub.load), LoRA r=16 alpha=32 on all linear layers of the blocks, fp32, CPU,
torch.set_num_threads(2); synthetic random token ids (no data files).
    sft  4 rows x 256 tokens, loss on every token
    dpo  4 pairs, each a 64-token prompt + a 64-token completion, collated as train_dpo.py does: 4 shared-prompt rows
         [prompt | chosen | rejected] of 192 tokens (--share-prompt 0: 8 rows of 128), one policy forward +
         backward, and the reference forward (adapter disabled, no grad) every step, as without --precompute-ref
    rm   4 pairs as for dpo: the score head at each response's last token, Bradley-Terry loss
The step is built from the same functions the scripts use (token_logprobs, sft_loss, packing.pair_logprobs,
dpo_loss, packing.pair_rewards, bradley_terry_loss, disable_adapter, loop.make_optimizer, clip_grad_norm_).
Each algo runs in a fresh subprocess; after `--warmup` steps, `step_s` is the median of `--steps` timed steps.
tokens_per_s counts every token in the batch as the workload states it (dpo/rm: 8 x 128, chosen and rejected,
however many tokens the collation actually runs: processed_tokens). peak_rss_mb is the process's peak resident
set (VmHWM), as for the peers.

flops_per_token: model FLOPs of a step (what the algorithm needs, not what our kernels happen to recompute) per
workload token, with N_body the frozen weights of the blocks' linear layers, N_lora the adapter weights, L layers,
d width, T the row length, V vocabulary; per PROCESSED token, and per SCORED token for the lm_head:
    policy (fwd + input-grad bwd):   4*N_body + 6*N_lora + 12*L*T*d (attention: QK^T and AV, x3);  + 4*V*d scored
    reference forward (dpo only):    2*N_body + 4*L*T*d;  + 2*V*d scored
    rm: no lm_head (the score head's 6*d is negligible)
mfu = flops_per_token * tokens_per_s / peak, the peak measured in the same run by timing a 2048^3 fp32 torch.mm.
Memory note: ~0.5 GB of a dpo step's peak_rss_mb is glibc heap fragmentation within the forward pass (freed
temporaries stay resident): its live peak is ~2.2 GB with shared-prompt rows. `MALLOC_MMAP_THRESHOLD_=65536 python
bench/train_step.py` keeps RSS at that (big tensors are mmap'ed and returned), at ~1.8x the time per step (page
faults); calling malloc_trim between steps does not lower the peak.
Peers (measured on this machine by bench/compare.py): TRL 1.16 + PEFT 0.21 DPO 10.7 s/step, 96 tok/s, 4.27 GB peak RSS;
TRL SFT 7.9 s/step, 130 tok/s, 4.45 GB. Goals: dpo >= 2x the throughput at <= 0.6x the RSS; sft >= 1.5x.
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time

PEERS = {"sft": {"name": "trl-sft+peft", "step_s": 7.9, "tokens_per_s": 130.0, "peak_rss_mb": 4450.0},
         "dpo": {"name": "trl-dpo+peft", "step_s": 10.7, "tokens_per_s": 96.0, "peak_rss_mb": 4270.0}}
GOALS = {"sft": {"tokens_per_s": 1.5}, "dpo": {"tokens_per_s": 2.0, "peak_rss_mb": 0.6}}


def peak_flops(torch, n: int = 2048, reps: int = 3, device: str = "cpu", dtype=None) -> float:
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    torch.mm(a, b)
    sync = torch.cuda.synchronize if device.startswith("cuda") else lambda: None
    best = min(_timed(lambda: (torch.mm(a, b), sync())) for _ in range(reps))
    return 2 * n ** 3 / best


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def worker(algo: str, warmup: int, steps: int, init: str, seq_len: int = 0, share: bool = True,
           compiled: bool = False, device: str = "cpu", bf16: bool = False) -> dict:
    """One algo's benchmark row. seq_len (bench/compare.py --quick) shortens the rows; dpo/rm keep the last half as
    the response. share=False runs the pairs as (2B, T) rows instead of shared-prompt rows; compiled=True is the
    scripts' --compile (torch.compile'd pointwise and log-prob kernels; compiling happens in the warmup steps).
    device/bf16 (bench/gpu.py): the same step on another device, under bf16 autocast, with mfu against a bf16 mm."""
    import torch

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from nanoalign import loop
    from nanoalign.fast import compile_pointwise
    from nanoalign.hub import load
    from nanoalign.logprobs import token_logprobs
    from nanoalign.lora import apply_lora, disable_adapter, lora_layers
    from nanoalign.losses import bradley_terry_loss, dpo_loss, sft_loss
    from nanoalign.packing import collate_shared, pair_logprobs, pair_rewards
    from nanoalign.data import collate_pairs

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", 2)))
    torch.manual_seed(0)
    model, tok = load(init, device=device)
    if algo == "rm":
        model.add_score_head()
    apply_lora(model, r=16, alpha=32.0, trainable=("score",) if algo == "rm" else ())
    model = compile_pointwise(model) if compiled else model
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = loop.make_optimizer(params, 1e-5)
    c = model.cfg
    V, d, L = c.vocab_size, c.hidden_size, c.num_hidden_layers

    # synthetic batch: sft (4, 256) all in the loss; dpo/rm 4 pairs of a P-token prompt + two (T-P)-token responses,
    # as the scripts collate them: shared-prompt rows (4, P + 2(T-P)), or with share=False (8, T) chosen then rejected
    B, T, P = (4, seq_len or 256, 1) if algo == "sft" else (8, seq_len or 128, (seq_len or 128) // 2)
    g = torch.Generator().manual_seed(0)
    if algo == "sft":
        ids = torch.randint(3, V, (B, T), generator=g).to(device)
        att = torch.ones(B, T, dtype=torch.long, device=device)
        resp = att.clone()
        resp[:, :P] = 0
        processed, scored = B * T, B * (T - 1)
    else:
        rand = [torch.randint(3, V, (T - P,), generator=g).tolist() for _ in range(3 * B // 2)]
        exs = [{"prompt": rand[3 * i], "chosen": rand[3 * i + 1], "rejected": rand[3 * i + 2],
                "chosen_mask": [1] * (T - P), "rejected_mask": [1] * (T - P)} for i in range(B // 2)]
        batch = (collate_shared if share else collate_pairs)(exs, 0, T)
        real = batch["branch_ids"] >= 0 if share else batch["attention_mask"].bool()  # (rows, T) real tokens
        processed, scored = int(real.sum()), B * (T - P)
    autocast = lambda: torch.autocast(torch.device(device).type, torch.bfloat16, enabled=bf16)
    batch = {k: v.to(device) for k, v in batch.items()} if algo != "sft" else None

    def step():
        if algo == "sft":
            with autocast():
                logps = token_logprobs(model, ids, att, resp, compiled=compiled)  # (B, T-1), fp32
            loss = sft_loss(logps, resp[:, 1:])
        elif algo == "dpo":
            with autocast():
                policy = pair_logprobs(model, batch, compiled)  # (chosen, rejected), each (B/2,)
                with torch.no_grad(), disable_adapter(model):
                    reference = pair_logprobs(model, batch, compiled)
            loss = dpo_loss(*policy, *reference, 0.1)[0].mean()
        else:
            with autocast():
                loss = bradley_terry_loss(*pair_rewards(model, batch)).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    for _ in range(warmup):
        step()
    times = [_timed(step) for _ in range(steps)]
    step_s = statistics.median(times)
    with open("/proc/self/status") as f:
        peak_rss_mb = int(re.search(r"VmHWM:\s+(\d+)", f.read()).group(1)) / 1024

    n_body = sum(m.base.weight.numel() for m in lora_layers(model).values())
    n_lora = sum(m.lora_A.weight.numel() + m.lora_B.weight.numel() for m in lora_layers(model).values())
    attn = 12 * L * (T if algo == "sft" else batch["input_ids"].shape[1]) * d  # per token: QK^T and AV over the row
    policy = processed * (4 * n_body + 6 * n_lora + attn) + (0 if algo == "rm" else scored * 4 * V * d)
    reference = processed * (2 * n_body + attn // 3) + scored * 2 * V * d if algo == "dpo" else 0
    flops_per_token = (policy + reference) / (B * T)  # per token of the workload (dpo/rm: 8 x 128)
    tokens_per_s = B * T / step_s
    peak = peak_flops(torch, 8192 if device.startswith("cuda") else 2048, device=device,
                      dtype=torch.bfloat16 if bf16 else torch.float32)
    row = {"name": f"{algo}-lora16-{init}" + ("-compiled" if compiled else ""), "step_s": round(step_s, 3),
           "tokens_per_s": round(tokens_per_s, 1),
           "peak_rss_mb": round(peak_rss_mb, 1), "flops_per_token": int(flops_per_token),
           "mfu": round(flops_per_token * tokens_per_s / peak, 4), "peak_gflops": round(peak / 1e9, 1),
           "batch": B, "seq_len": T, "share_prompt": share and algo != "sft", "compiled": compiled,
           "processed_tokens": processed,
           "threads": torch.get_num_threads(), "warmup": warmup, "steps": steps,
           "step_s_all": [round(t, 3) for t in times]}
    if algo in PEERS:
        peer = PEERS[algo]
        ratio = {"tokens_per_s": round(tokens_per_s / peer["tokens_per_s"], 2),
                 "peak_rss_mb": round(peak_rss_mb / peer["peak_rss_mb"], 3)}
        goal = GOALS[algo]
        row.update(peer=peer, ratio=ratio, goal_met=ratio["tokens_per_s"] >= goal["tokens_per_s"]
                   and ratio["peak_rss_mb"] <= goal.get("peak_rss_mb", float("inf")))
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--algo", default="all", choices=["sft", "dpo", "rm", "all"])
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    ap.add_argument("--steps", type=int, default=5, help="timed steps (the median is reported)")
    ap.add_argument("--init", default="smollm2-135m-instruct", help="the model (e.g. tiny, for a quick check)")
    ap.add_argument("--share-prompt", type=int, default=1, help="dpo/rm: 1 = shared-prompt rows, 0 = (2B, T) rows")
    ap.add_argument("--compile", action="store_true", help="the scripts' --compile (pointwise + log-prob kernels)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.algo, args.warmup, args.steps, args.init, share=bool(args.share_prompt),
                                compiled=args.compile)))
        return
    for algo in (["sft", "dpo", "rm"] if args.algo == "all" else [args.algo]):
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--algo", algo, "--warmup", str(args.warmup),
               "--steps", str(args.steps), "--init", args.init, "--share-prompt", str(args.share_prompt)]
        cmd += ["--compile"] if args.compile else []
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        print(out.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
