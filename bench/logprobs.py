"""Benchmark the lm_head log-prob hot loop: naive vs chunked (eager, compiled), forward + backward.

Run: python bench/logprobs.py [--reps 2] [--chunk 128] [--frozen-head]
Workload: B=8, T=512, d=576, V=49152 (SmolLM2-135M's head), fp32, CPU, 2 threads; loss = Σ logp, backward to
hidden and (unless --frozen-head, the LoRA case) to the head weight.
Each workload runs in a fresh subprocess: one warm-up step (and compile), then `reps` timed steps.
- step_s: median wall time of a step; cpu_s: its median process CPU time (steadier on a shared machine).
- peak_mem_mb: peak RSS during a step minus the RSS just before it. The kernel's peak-RSS counter (VmHWM) is reset
  before each step by writing "5" to /proc/self/clear_refs. Blocks this large are mmap'ed, so freed memory leaves
  RSS and the figure is the op's own (gradients included).
- page_faults: minor page faults per step (fresh memory the kernel had to zero).
Prints one JSON line per workload, then a summary line with the ratios to naive.
"""
import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import time

B, T, D, V = 8, 512, 576, 49152


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{key}:\s+(\d+)", f.read()).group(1))


def worker(name: str, reps: int, frozen_head: bool, chunk: int) -> dict:
    import torch

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from nanoalign.logprobs import logprobs_chunked, logprobs_naive

    torch.set_num_threads(2)
    torch.manual_seed(0)
    hidden = torch.randn(B, T, D).requires_grad_()
    weight = (torch.randn(V, D) * 0.02).requires_grad_(not frozen_head)
    labels = torch.randint(0, V, (B, T))
    fn = {
        "naive": lambda: logprobs_naive(hidden, weight, labels),
        "chunked-eager": lambda: logprobs_chunked(hidden, weight, labels, chunk=chunk, compiled=False),
        "chunked-compiled": lambda: logprobs_chunked(hidden, weight, labels, chunk=chunk, compiled=True),
    }[name]

    def step():
        hidden.grad = weight.grad = None  # so each step allocates its gradients, as a training step does
        fn().sum().backward()

    step()  # warm-up (and compile)
    times, cpu, peak_mb = [], [], 0.0
    faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(reps):
        hidden.grad = weight.grad = None
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak-RSS counter
        base = _status_kb("VmRSS")
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        peak_mb = max(peak_mb, (_status_kb("VmHWM") - base) / 1024)
    step_s = statistics.median(times)
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0) / reps
    return {"name": name + ("-frozen-head" if frozen_head else ""), "step_s": round(step_s, 3),
            "cpu_s": round(statistics.median(cpu), 3), "tokens_per_s": round(B * T / step_s, 1),
            "peak_mem_mb": round(peak_mb, 1), "page_faults": int(faults),
            "B": B, "T": T, "d": D, "V": V, "chunk": chunk, "threads": 2, "reps": reps}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=2, help="timed steps per workload (after one warm-up)")
    ap.add_argument("--chunk", type=int, default=128, help="tokens per chunk for the chunked paths")
    ap.add_argument("--frozen-head", action="store_true", help="head weight without gradient (LoRA / QLoRA)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.reps, args.frozen_head, args.chunk)))
        return
    rows = {}
    for name in ("naive", "chunked-eager", "chunked-compiled"):
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", name, "--reps", str(args.reps),
               "--chunk", str(args.chunk)] + (["--frozen-head"] if args.frozen_head else [])
        row = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
        rows[name] = row
        print(json.dumps(row), flush=True)
    naive = rows.pop("naive")
    ratio = {n: {k: round(r[k] / naive[k], 3) for k in ("step_s", "cpu_s", "peak_mem_mb")} for n, r in rows.items()}
    goal = {n: r["step_s"] <= 1.0 and r["peak_mem_mb"] <= 1 / 8 for n, r in ratio.items()}
    print(json.dumps({"name": "summary" + ("-frozen-head" if args.frozen_head else ""), "ratio": ratio,
                      "goal_mem_le_1_8_and_time_le_1": goal}))


if __name__ == "__main__":
    main()
