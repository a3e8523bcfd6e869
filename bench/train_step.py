"""Benchmark one optimizer step of SFT, DPO and the reward model on the standard workload.

Run: python bench/train_step.py [--algo sft|dpo|rm|all] [--warmup 2] [--steps 5] [--init tiny (a quick check)]
Workload: SmolLM2-135M-Instruct (hub.load), LoRA r=16 alpha=32 on all linear layers of the blocks, fp32, CPU,
torch.set_num_threads(2); synthetic random token ids (no data files).
    sft  4 rows x 256 tokens, loss on every token
    dpo  4 pairs, each a 64-token prompt + a 64-token completion: one (8, 128) policy forward + backward, and the
         reference forward (adapter disabled, no grad) every step, as train_dpo.py does without --precompute-ref
    rm   4 pairs as for dpo: the score head at the last real token, Bradley-Terry loss
The step is built from the same nanoalign functions the scripts use (token_logprobs, sft_loss, preference_loss,
bradley_terry_loss, disable_adapter, loop.make_optimizer / clip_and_step). Each algo runs in a fresh subprocess;
after `--warmup` steps, `step_s` is the median of `--steps` timed steps. tokens_per_s counts every token in the
batch (dpo/rm: chosen and rejected). peak_rss_mb is the process's peak resident set (VmHWM), as for the peers.

flops_per_token: model FLOPs (what the algorithm needs, not what our kernels happen to recompute), with N_body the
frozen weights of the blocks' linear layers, N_lora the adapter weights, L layers, d width, T sequence length, V
vocabulary and f the fraction of tokens whose log-prob is needed (the lm_head skips the rest):
    policy (fwd + input-grad bwd):   4*N_body + 6*N_lora + 12*L*T*d (attention: QK^T and AV, x3) + 4*V*d*f
    reference forward (dpo only):    2*N_body + 4*L*T*d + 2*V*d*f
    rm: no lm_head (the score head's 6*d is negligible)
mfu = flops_per_token * tokens_per_s / peak, the peak measured in the same run by timing a 2048^3 fp32 torch.mm.
Memory note: most of peak_rss_mb past step 1 is glibc heap fragmentation (freed activations stay resident): the
live peak of a dpo step is ~2.5 GB. `MALLOC_MMAP_THRESHOLD_=131072 python bench/train_step.py` keeps RSS at that
(big tensors are mmap'ed and returned), at ~25% more CPU per step (page faults).
Peers (measured on this machine, REFERENCE.md): TRL 1.16 + PEFT 0.21 DPO 10.7 s/step, 96 tok/s, 4.27 GB peak RSS;
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


def peak_flops(torch, n: int = 2048, reps: int = 3) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = min(_timed(lambda: torch.mm(a, b)) for _ in range(reps))
    return 2 * n ** 3 / best


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def worker(algo: str, warmup: int, steps: int, init: str, seq_len: int = 0) -> dict:
    """One algo's benchmark row. seq_len (bench/compare.py --quick) shortens the rows; dpo/rm keep the last half as
    the response."""
    import torch

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from nanoalign import loop
    from nanoalign.hub import load
    from nanoalign.logprobs import token_logprobs
    from nanoalign.lora import apply_lora, disable_adapter, lora_layers
    from nanoalign.losses import bradley_terry_loss, preference_loss, sft_loss
    from nanoalign.model import last_token_index

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", 2)))
    torch.manual_seed(0)
    model, tok = load(init)
    if algo == "rm":
        model.add_score_head()
    apply_lora(model, r=16, alpha=32.0, trainable=("score",) if algo == "rm" else ())
    model.train()
    params = loop.trainable(model)
    opt = loop.make_optimizer(params, 1e-5)
    c = model.cfg
    V, d, L = c.vocab_size, c.hidden_size, c.num_hidden_layers

    # synthetic batch: sft (4, 256) all in the loss; dpo/rm (8, 128) = 4 chosen then 4 rejected, response = last 64
    B, T, P = (4, seq_len or 256, 1) if algo == "sft" else (8, seq_len or 128, (seq_len or 128) // 2)
    ids = torch.randint(3, V, (B, T))
    att = torch.ones(B, T, dtype=torch.long)
    resp = torch.zeros(B, T, dtype=torch.long)
    resp[:, P:] = 1

    def step():
        if algo == "sft":
            logps = token_logprobs(model, ids, att, resp)  # (B, T-1)
            loss = sft_loss(logps, resp[:, 1:])
        elif algo == "dpo":
            logps = token_logprobs(model, ids, att, resp).sum(-1)  # (2B',)
            with torch.no_grad(), disable_adapter(model):
                ref = token_logprobs(model, ids, att, resp).sum(-1)
            losses, _, _ = preference_loss(*logps.chunk(2), *ref.chunk(2), beta=0.1)
            loss = losses.mean()
        else:
            hidden = model(ids, att, return_hidden=True)  # (2B', T, C)
            last = last_token_index(att)
            rewards = model.score(hidden[torch.arange(B), last]).squeeze(-1)
            loss = bradley_terry_loss(*rewards.chunk(2)).mean()
        loss.backward()
        loop.clip_and_step(opt, params, 1e-5, 1.0)

    for _ in range(warmup):
        step()
    times = [_timed(step) for _ in range(steps)]
    step_s = statistics.median(times)
    with open("/proc/self/status") as f:
        peak_rss_mb = int(re.search(r"VmHWM:\s+(\d+)", f.read()).group(1)) / 1024

    n_body = sum(m.base.weight.numel() for m in lora_layers(model).values())
    n_lora = sum(m.lora_A.weight.numel() + m.lora_B.weight.numel() for m in lora_layers(model).values())
    f = float(resp[:, 1:].sum()) / (B * T)
    policy = 4 * n_body + 6 * n_lora + 12 * L * T * d + (0 if algo == "rm" else 4 * V * d * f)
    reference = 2 * n_body + 4 * L * T * d + 2 * V * d * f if algo == "dpo" else 0
    flops_per_token = policy + reference
    tokens_per_s = B * T / step_s
    peak = peak_flops(torch)
    row = {"name": f"{algo}-lora16-{init}", "step_s": round(step_s, 3), "tokens_per_s": round(tokens_per_s, 1),
           "peak_rss_mb": round(peak_rss_mb, 1), "flops_per_token": int(flops_per_token),
           "mfu": round(flops_per_token * tokens_per_s / peak, 4), "peak_gflops": round(peak / 1e9, 1),
           "batch": B, "seq_len": T, "threads": torch.get_num_threads(), "warmup": warmup, "steps": steps,
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
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.algo, args.warmup, args.steps, args.init)))
        return
    for algo in (["sft", "dpo", "rm"] if args.algo == "all" else [args.algo]):
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--algo", algo, "--warmup", str(args.warmup),
               "--steps", str(args.steps), "--init", args.init]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        print(out.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
