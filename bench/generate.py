"""Sampling throughput: nanoalign's KV-cache generate (eager and compiled) vs transformers' model.generate.

    python bench/generate.py [--batches 1 8] [--prompt-len 32] [--new 64] [--reps 3] [--no-peer]

Workload: SmolLM2-135M-Instruct, random 32-token prompts, 64 new tokens (EOS never stops a row, so every setting
produces exactly batch x 64 tokens), sampling at T=1, fp32, 2 threads. Each setting runs in its own subprocess so
peak RSS is its own. Prints one JSON line per setting, then one summary line with the ratios to transformers.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def one(kind: str, batch: int, prompt_len: int, new: int, reps: int, compiled: bool) -> dict:
    import torch
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", 2)))
    sys.path.insert(0, ROOT)
    from nanoalign import hub
    from nanoalign.generate import generate
    model, tok = hub.load(hub.ALIAS)
    model.eval()
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(100, 40000, (batch, prompt_len), generator=g)
    if kind == "hf":
        import transformers
        hf = transformers.AutoModelForCausalLM.from_pretrained(os.path.join(hub.cache_dir(), hub.ALIAS),
                                                               dtype=torch.float32).eval()
        del model

        def run():
            with torch.no_grad():
                hf.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=True, temperature=1.0,
                            top_k=0, top_p=1.0, max_new_tokens=new, min_new_tokens=new, pad_token_id=tok.pad_id)
    else:
        def run():
            generate(model, prompts.tolist(), new, eos_id=-1, pad_id=tok.pad_id, temperature=1.0, generator=g,
                     compile=compiled)
    run()  # warmup (and compilation)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    t = statistics.median(times)
    return {"name": f"generate/{kind}", "batch": batch, "compiled": compiled, "prompt_len": prompt_len,
            "new_tokens": new, "step_s": t / new, "tokens_per_s": batch * new / t,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--no-peer", action="store_true")
    ap.add_argument("--child", nargs=3, metavar=("KIND", "BATCH", "COMPILED"))
    a = ap.parse_args()
    if a.child:
        kind, batch, compiled = a.child[0], int(a.child[1]), a.child[2] == "1"
        print(json.dumps(one(kind, batch, a.prompt_len, a.new, a.reps, compiled)))
        return
    try:
        import transformers  # noqa: F401
        peer = not a.no_peer
    except ImportError:
        peer = False
    results = []
    for batch in a.batches:
        settings = [("nanoalign", 0), ("nanoalign", 1)] + ([("hf", 0)] if peer else [])
        for kind, compiled in settings:
            cmd = [sys.executable, __file__, "--child", kind, str(batch), str(compiled), "--prompt-len",
                   str(a.prompt_len), "--new", str(a.new), "--reps", str(a.reps)]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                print(json.dumps({"name": f"generate/{kind}", "batch": batch, "error": r.stderr.strip()[-300:]}))
                continue
            row = json.loads(r.stdout.strip().splitlines()[-1])
            results.append(row)
            print(json.dumps(row), flush=True)
    if peer:
        for batch in a.batches:
            hf = [r for r in results if r["batch"] == batch and r["name"] == "generate/hf"]
            ours = [r for r in results if r["batch"] == batch and r["name"] == "generate/nanoalign"]
            if hf and ours:
                best = max(ours, key=lambda r: r["tokens_per_s"])
                print(json.dumps({"name": "generate/summary", "batch": batch, "tokens_per_s": best["tokens_per_s"],
                                  "compiled": best["compiled"], "peer": {"tokens_per_s": hf[0]["tokens_per_s"],
                                                                         "peak_rss_mb": hf[0]["peak_rss_mb"]},
                                  "ratio": {"tokens_per_s": best["tokens_per_s"] / hf[0]["tokens_per_s"],
                                            "peak_rss_mb": best["peak_rss_mb"] / hf[0]["peak_rss_mb"]}}))


if __name__ == "__main__":
    main()
