"""The boring parts every training script shares, kept out of the scripts so their loops read top to bottom.

Distributed: launched by torchrun, each rank takes its slice of every global batch, and gradients are summed with
all_reduce after the micro-batches. Losses are normalised by *global* counts (tokens or pairs), so one process with
batch B x accum A x world W gives the same step as W processes (pitfall 7). Only rank 0 writes, after a barrier.
"""
import datetime
import glob
import json
import math
import os
import shutil
import sys

import torch
import torch.distributed as dist

from .checkpoint import (atomic_write, load_train_state, rng_state, save_checkpoint, save_train_state, set_rng_state,
                         write_json)
from .cli import UserError, check
from .faults import crash_in_save, fault_injection


class TrainingError(Exception):
    """A run that cannot go on (e.g. a non-finite loss): one `error:` line, exit code 1, last checkpoint kept."""


# --- devices and processes -------------------------------------------------------------------------------------
def setup(seed: int, device: str = "auto"):
    """-> (device, rank, world). Seeds every RNG; joins the process group when launched by torchrun."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    check(device == "cpu" or device.startswith("cuda"), f"--device must be cpu, cuda or auto, got {device!r}")
    check(not device.startswith("cuda") or torch.cuda.is_available(), "--device cuda: no CUDA device is available")
    if world > 1 and not dist.is_initialized():
        local = int(os.environ.get("LOCAL_RANK", 0))
        if device.startswith("cuda"):
            torch.cuda.set_device(local)
            device = f"cuda:{local}"
        # a timeout, so that a killed rank ends the job with a message instead of a hang
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo",
                                timeout=datetime.timedelta(seconds=int(os.environ.get("NANOALIGN_DIST_TIMEOUT", 120))))
    seed_all(seed)
    return device, rank, world


def seed_all(seed: int):
    import random

    import numpy as np
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def barrier():
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks (identity in a single process)."""
    if dist.is_initialized():
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM)  # SUM, never AVG: AVG can silently sum on gloo (pytorch #162338)
    return x


def all_reduce_grads(params):
    if dist.is_initialized():
        for p in params:
            if p.grad is not None:
                dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)


def shard(indices: list, rank: int, world: int) -> list:
    """This rank's share of one global batch: every world-th item."""
    return indices[rank::world]


def batch_indices(step: int, global_batch: int, n: int, seed: int) -> list[int]:
    """Indices of the global batch for `step`: a fresh seeded permutation per epoch, so the data position is a
    pure function of the step and resume needs no iterator state."""
    out = []
    for j in range(step * global_batch, (step + 1) * global_batch):
        epoch, k = divmod(j, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
        out.append(int(perm[k]))
    return out


# --- model, optimizer, schedule --------------------------------------------------------------------------------
def prepare_model(init: str, device: str, lora_rank: int = 0, lora_alpha: float = 16.0, lora_dropout: float = 0.0,
                  nf4: bool = False, trainable=()):
    """Load --init, optionally quantize to NF4 (QLoRA) and add LoRA adapters. Returns (model, tokenizer)."""
    from .hub import load
    from .lora import apply_lora
    from .nf4 import quantize_nf4_
    check(lora_rank >= 0, f"--lora-rank must be >= 0, got {lora_rank}")
    check(not nf4 or lora_rank > 0, "--nf4 needs --lora-rank > 0 (QLoRA trains adapters on a frozen 4-bit base)")
    model, tok = load(init, device)
    if nf4:
        quantize_nf4_(model)
    if lora_rank > 0:
        apply_lora(model, r=lora_rank, alpha=lora_alpha, dropout=lora_dropout, trainable=trainable)
    return model, tok


def trainable(model) -> list:
    return [p for p in model.parameters() if p.requires_grad]


def make_optimizer(params, lr: float, weight_decay: float = 0.0):
    check(lr > 0, f"--lr must be > 0, got {lr}")
    return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay, eps=1e-8)


def lr_at(step: int, max_steps: int, lr: float, warmup: int) -> float:
    """Linear warmup, then cosine decay to 10% of lr."""
    if step < warmup:
        return lr * (step + 1) / warmup
    frac = (step - warmup) / max(1, max_steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))


def clip_and_step(opt, params, lr: float, max_norm: float, step: int = 0, out: str = "", skip: bool = False):
    """Set the lr, clip the global gradient norm, take the optimizer step; returns the norm. A non-finite norm (an
    inf/NaN gradient under a finite loss) is a non-finite loss too: stop, or with skip drop the step (returns nan).
    The step (1-based) is only for the message and the fault-injection hooks of the tests."""
    fault_injection(step, params)
    for g in opt.param_groups:
        g["lr"] = lr
    grads = [p.grad for p in params if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm) if max_norm > 0 else torch.nn.utils.get_total_norm(grads)
    if not torch.isfinite(norm):  # the same on every rank: the gradients were all-reduced
        opt.zero_grad(set_to_none=True)
        if skip:
            return float("nan")
        raise TrainingError(f"non-finite gradient norm ({float(norm)}) at step {step}; stopped, the last good "
                            f"checkpoint in {out} is intact (use --resume, a lower --lr, or --skip-nonfinite)")
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(norm)


def step_or_skip(opt, params, loss_t: torch.Tensor, lr: float, step: int, cfg) -> float:
    """The guarded optimizer step every script takes: a non-finite loss stops the run (the last train_state.pt stays
    intact) or, with cfg.skip_nonfinite, skips the step; otherwise sum the gradients over ranks, clip, and step at
    `lr`. Returns the gradient norm: nan for a skipped step (a non-finite gradient norm is skipped the same way)."""
    if not check_finite(loss_t, step, cfg.out, cfg.skip_nonfinite):
        opt.zero_grad(set_to_none=True)
        return float("nan")
    all_reduce_grads(params)
    return clip_and_step(opt, params, lr, cfg.grad_clip, step, cfg.out, cfg.skip_nonfinite)


def check_finite(loss: torch.Tensor, step: int, out: str, skip: bool = False) -> bool:
    """True if finite. Otherwise stop the run (the last good checkpoint stays), or with skip, tell the caller to
    skip the step."""
    if torch.isfinite(loss).all():
        return True
    if skip:
        return False
    raise TrainingError(f"non-finite loss ({float(loss)}) at step {step}; stopped, the last good checkpoint in "
                        f"{out} is intact (use --resume, a lower --lr, or --skip-nonfinite)")


# --- output directory, train state -----------------------------------------------------------------------------
def prepare_out(out: str, cfg, resume: bool, rank: int = 0):
    """Refuse to mix runs: an --out that holds a different run needs --resume (for this run) or a new path."""
    check(bool(out), "--out is required")
    check(not os.path.exists(out) or os.path.isdir(out), f"{out}: exists and is not a directory; choose a new --out")
    run_file = os.path.join(out, "run.json")
    this = {k: v for k, v in vars(cfg).items() if k not in ("resume", "max_steps", "save_every", "log_every")}
    if os.path.exists(run_file):
        try:
            with open(run_file) as f:
                prev = json.load(f)
        except (OSError, ValueError):
            prev = None
        if not isinstance(prev, dict):
            raise UserError(f"{run_file}: unreadable run record; choose a new --out")
        if not resume:
            raise UserError(f"{out}: already holds a run; pass --resume to continue it, or choose a new --out")
        diff = sorted(k for k in this if k in prev and prev[k] != this[k] and k not in ("device", "compile"))
        if diff:
            raise UserError(f"{out}: --resume with different settings ({', '.join(diff)}) than the saved run")
    elif resume:
        raise UserError(f"{out}: nothing to resume (no run.json)")
    elif os.path.isdir(out) and os.listdir(out):
        raise UserError(f"{out}: exists and is not empty; choose a new --out")
    if rank == 0:
        os.makedirs(out, exist_ok=True)
        write_json(run_file, this)
        for tmp in glob.glob(os.path.join(out, "*.tmp-*")) + glob.glob(os.path.join(out, ".tok-*")):
            if os.path.isdir(tmp):  # a killed run's half-written temporaries (checkpoint.atomic_write's names)
                shutil.rmtree(tmp)
            else:
                os.remove(tmp)


def start_or_resume(cfg, model, opt, rank: int = 0) -> dict:
    """Record the run in --out (rank 0, after every rank has checked it with prepare_out(rank=-1)), or, with
    --resume, restore its train state. -> the state: step 0 and no extras for a fresh run."""
    barrier()
    if rank == 0:
        prepare_out(cfg.out, cfg, cfg.resume, rank)
    return load_state(cfg.out, model, opt) if cfg.resume else {"step": 0, "extra": {}}


def save_state(out: str, model, opt, step: int, extra: dict | None = None, rank: int = 0):
    """Trainable weights, optimizer, step, RNGs and any extra state (e.g. the KL controller), atomically."""
    barrier()
    if rank == 0:
        weights = {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}
        state = {"step": step, "weights": weights, "optimizer": opt.state_dict(), "rng": rng_state(),
                 "extra": extra or {}}
        crash_in_save(out, state, step)  # fault injection for the crash-safety tests (off unless set)
        save_train_state(out, state)
    barrier()


def load_state(out: str, model, opt) -> dict:
    """Restore what save_state wrote. log.jsonl loses its rows past the saved step: a run killed after the save
    logged them, and the resumed run logs them again."""
    st = load_train_state(out)
    params = dict(model.named_parameters())
    for n, w in st["weights"].items():
        if n not in params:
            raise UserError(f"{out}/train_state.pt: parameter {n} does not exist in this model")
        with torch.no_grad():
            params[n].copy_(w)
    opt.load_state_dict(st["optimizer"])
    set_rng_state(st["rng"])
    if not dist.is_initialized() or dist.get_rank() == 0:
        truncate_log(os.path.join(out, "log.jsonl"), st["step"])
    return st


def truncate_log(path: str, step: int):
    """Keep the rows of log.jsonl up to `step` (and drop a line cut short by a kill)."""
    if not os.path.exists(path):
        return
    rows = []
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and row.get("step", 0) <= step:
                rows.append(line if line.endswith("\n") else line + "\n")

    def w(tmp):
        with open(tmp, "w") as f:
            f.writelines(rows)
    atomic_write(path, w)


def finish(out: str, model, tok, metrics: dict, rank: int = 0, lora: bool = False):
    """Save the final checkpoint: adapters merged (so transformers loads it), plus the adapter alone (PEFT)."""
    from .lora import merge_lora, save_adapter
    barrier()
    if rank == 0:
        if lora:
            save_adapter(model, os.path.join(out, "adapter"))
            merge_lora(model)
        save_checkpoint(out, model, tok)
        write_json(os.path.join(out, "metrics.json"), metrics)
    barrier()
    if dist.is_initialized():
        dist.destroy_process_group()


def main_guard(main, cls):
    """`if __name__ == "__main__": main_guard(main, Config)`: flags, one-line errors, exit codes 2 (bad input) /
    1 (training error)."""
    from .cli import run
    try:
        return run(main, cls)
    except TrainingError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except dist.DistError as e:  # a peer rank died or hung past the timeout: one line, not a gloo/NCCL traceback
        rank = dist.get_rank() if dist.is_initialized() else 0
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"error: rank {rank}: the process group failed ({msg}); a peer rank died or timed out. The last "
              "train_state.pt in --out is intact: rerun with --resume", file=sys.stderr)
        sys.exit(1)
