"""Sampling throughput: nanoalign's KV-cache generate (eager, compiled, bf16 weights) vs transformers' generate.

    python bench/generate.py [--batches 1 8] [--prompt-len 32] [--new 64] [--reps 3] [--rounds 2] [--no-peer]
                             [--no-compile] [--interleave]

Workload: SmolLM2-135M-Instruct, random 32-token prompts, 64 new tokens (EOS never stops a row, so every setting
produces exactly batch x 64 tokens), pure sampling at T=1, 2 threads. Settings: nanoalign fp32 eager on the model
itself; nanoalign.fast.sampling_copy in fp32 and in bf16 (weights packed for oneDNN: what train_ppo.py --bf16 and
evaluate --bf16 sample from); the decode step torch.compile'd (C++ wrapper; the packed matmuls stay oneDNN calls)
on the packed fp32 and bf16 copies (~1-2 min of compile each, --no-compile skips them);
transformers' model.generate in fp32 and in bf16 (dtype=torch.bfloat16). Each setting runs in its own subprocess
so that peak RSS is its own, once per round; its fastest round counts. One JSON line per run, then one summary
line per batch: our fastest setting against transformers' default (fp32), and the ratios at equal dtype.
--interleave instead runs our bf16 copy (eager, compiled) and HF fp32 in one process, in turn, --reps times each.
"""
import argparse
import itertools
import json
import os
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def setup(kind: str, batch: int, prompt_len: int, new: int, compiled: bool, dtype: str, packed: bool = False):
    """-> run(), one generate call of the setting on a fixed batch of random prompts."""
    import torch
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", 2)))
    sys.path.insert(0, ROOT)
    from nanoalign import hub
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(100, 40000, (batch, prompt_len), generator=g)
    if kind == "hf":
        import transformers
        path = os.path.join(hub.cache_dir(), hub.ALIAS)  # the converted checkpoint (the parent made sure it exists)
        hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).eval()

        def run():
            with torch.no_grad():
                hf.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=True, temperature=1.0,
                            top_k=0, top_p=1.0, max_new_tokens=new, min_new_tokens=new, pad_token_id=2)
    else:
        from nanoalign.fast import sampling_copy
        from nanoalign.generate import generate
        model, tok = hub.load(hub.ALIAS)
        if packed or dtype != "float32":  # a frozen copy (its unpacked weights are freed; the policy's stay)
            model = sampling_copy(model, getattr(torch, dtype), pack=packed)

        def run():
            generate(model, prompts.tolist(), new, eos_id=-1, pad_id=tok.pad_id, temperature=1.0, generator=g,
                     compile=compiled)
    return run


def one(kind: str, batch: int, prompt_len: int, new: int, reps: int, compiled: bool, dtype: str,
        packed: bool = False) -> dict:
    run = setup(kind, batch, prompt_len, new, compiled, dtype, packed)
    t0 = time.perf_counter()
    run()  # warmup (and compilation)
    warm_s = time.perf_counter() - t0
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    t = statistics.median(times)
    return {"name": f"generate/{kind}", "batch": batch, "compiled": compiled, "dtype": dtype, "packed": packed,
            "prompt_len": prompt_len, "new_tokens": new, "step_ms": 1000 * t / new, "tokens_per_s": batch * new / t,
            "first_call_s": warm_s, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def interleaved(batch: int, prompt_len: int, new: int, reps: int) -> dict:
    """Our bf16 copy (eager and compiled) and HF fp32 in one process, taking turns: the machine's drift then hits
    every setting alike, so the ratios are steadier than across processes (no per-setting peak RSS here)."""
    settings = {"eager_bf16": ("nanoalign", False, "bfloat16", True),
                "compiled_bf16": ("nanoalign", True, "bfloat16", True), "hf_fp32": ("hf", False, "float32", False)}
    runs = {k: setup(kind, batch, prompt_len, new, c, d, p) for k, (kind, c, d, p) in settings.items()}
    for run in runs.values():
        run()  # warmup (and compilation)
    times = {k: [] for k in runs}
    for _, (k, run) in itertools.product(range(reps), runs.items()):
        t0 = time.perf_counter()
        run()
        times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"name": "generate/interleaved", "batch": batch, "prompt_len": prompt_len, "new_tokens": new, "reps": reps,
            "step_ms": {k: round(1000 * t / new, 1) for k, t in med.items()},
            "tokens_per_s": {k: round(batch * new / t, 1) for k, t in med.items()},
            "ratio": {k: round(med["hf_fp32"] / med[k], 2) for k in ("eager_bf16", "compiled_bf16")}}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--no-peer", action="store_true")
    ap.add_argument("--no-compile", action="store_true", help="skip the compiled setting (~2 min of compile each)")
    ap.add_argument("--interleave", action="store_true", help="one process, settings in turn (see interleaved)")
    ap.add_argument("--child", nargs=5, metavar=("KIND", "BATCH", "COMPILED", "DTYPE", "PACKED"))
    a = ap.parse_args()
    if a.child:
        kind, batch, compiled, dtype, packed = a.child[0], int(a.child[1]), a.child[2] == "1", a.child[3], a.child[4]
        print(json.dumps(one(kind, batch, a.prompt_len, a.new, a.reps, compiled, dtype, packed == "1")))
        return
    if a.interleave:
        for batch in a.batches:
            print(json.dumps(interleaved(batch, a.prompt_len, a.new, a.reps)), flush=True)
        return
    sys.path.insert(0, ROOT)
    from nanoalign import hub
    hub.load(hub.ALIAS)  # convert the GGUF once, outside the timed children
    try:
        import transformers  # noqa: F401
        peer = not a.no_peer
    except ImportError:
        peer = False
    results = []
    settings = [("nanoalign", 0, "float32", 0), ("nanoalign", 0, "float32", 1), ("nanoalign", 0, "bfloat16", 1)]
    settings += [] if a.no_compile else [("nanoalign", 1, "float32", 1), ("nanoalign", 1, "bfloat16", 1)]
    settings += [("hf", 0, "float32", 0), ("hf", 0, "bfloat16", 0)] if peer else []
    # the machine's speed drifts by tens of percent over minutes: run every setting once per round, keep its best
    for batch, _, (kind, compiled, dtype, packed) in itertools.product(a.batches, range(a.rounds), settings):
        cmd = [sys.executable, __file__, "--child", kind, str(batch), str(compiled), dtype, str(packed),
               "--prompt-len", str(a.prompt_len), "--new", str(a.new), "--reps", str(a.reps)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            print(json.dumps({"name": f"generate/{kind}", "batch": batch, "error": r.stderr.strip()[-300:]}))
            continue
        row = json.loads(r.stdout.strip().splitlines()[-1])
        results.append(row)
        print(json.dumps(row), flush=True)
    if not peer:
        return
    for batch in a.batches:
        rows = {}
        for r in sorted(results, key=lambda r: r["tokens_per_s"]):  # the fastest round of each setting wins
            if r["batch"] == batch:
                rows[(r["name"].split("/")[1], r["compiled"], r["dtype"], r["packed"])] = r
        hf32, hf16 = rows.get(("hf", False, "float32", False)), rows.get(("hf", False, "bfloat16", False))
        ours = [r for k, r in rows.items() if k[0] == "nanoalign"]
        if not (hf32 and ours):
            continue
        best = max(ours, key=lambda r: r["tokens_per_s"])
        best16 = max((r for r in ours if r["dtype"] == "bfloat16"), key=lambda r: r["tokens_per_s"], default=None)
        ratio = lambda ours, peer: round(ours["tokens_per_s"] / peer["tokens_per_s"], 2) if ours and peer else None
        print(json.dumps({"name": "generate/summary", "batch": batch, "tokens_per_s": best["tokens_per_s"],
                          "compiled": best["compiled"], "dtype": best["dtype"], "packed": best["packed"],
                          "peer": {"tokens_per_s": hf32["tokens_per_s"], "peak_rss_mb": hf32["peak_rss_mb"]},
                          "ratio": {"tokens_per_s": ratio(best, hf32), "peak_rss_mb":
                                    round(best["peak_rss_mb"] / hf32["peak_rss_mb"], 2)},
                          "ratio_fp32_eager_vs_hf_fp32": ratio(rows.get(("nanoalign", False, "float32", False)), hf32),
                          "ratio_fp32_packed_vs_hf_fp32": ratio(rows.get(("nanoalign", False, "float32", True)), hf32),
                          "ratio_bf16_vs_hf_bf16": ratio(best16, hf16),
                          "goal": {"tokens_per_s": 3.0}}))


if __name__ == "__main__":
    main()
