"""LoRA dropout on CPU: torch's F.dropout vs nanoalign.lora.Dropout, forward + backward, at the LoRA inputs of the
SFT workload (4 x 256 tokens; width 576 for q/k/v/o/gate/up, 1536 for down_proj) and of a train_rm.py step (4 pairs,
~133 tokens). One JSON line per shape: milliseconds per call (median of --reps) and the ratio.

Run: python bench/dropout.py [--p 0.05] [--reps 30]
A LoRA block calls dropout 7 times (6 at width 576, 1 at 1536) in each of its 30 layers, so per step that is
30 * (6 * ms_576 + ms_1536), against ~2 s for the whole RM step at bf16 (measured: README, Performance).
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from nanoalign.lora import Dropout  # noqa: E402


def fwd_bwd_ms(fn, x, g, reps):
    fn(x).backward(g)  # warm up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn(x).backward(g)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--p", type=float, default=0.05)
    ap.add_argument("--reps", type=int, default=30)
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", 2)))
    ours = Dropout(args.p).train()
    for shape in ((4, 256, 576), (4, 256, 1536), (4, 133, 576), (4, 133, 1536)):
        x, g = torch.randn(shape, requires_grad=True), torch.randn(shape)
        torch_ms = fwd_bwd_ms(lambda t: F.dropout(t, args.p, True), x, g, args.reps)
        ours_ms = fwd_bwd_ms(ours, x, g, args.reps)
        print(json.dumps({"shape": list(shape), "p": args.p, "torch_ms": round(torch_ms, 3),
                          "nanoalign_ms": round(ours_ms, 3), "speedup": round(torch_ms / ours_ms, 2)}), flush=True)


if __name__ == "__main__":
    main()
