"""What every training script shares, as small named helpers, so that each script's loop reads top to bottom.

Data parallel (torchrun): each rank takes its `shard` of every global batch; losses are divided by GLOBAL counts and
gradients summed over ranks, so W ranks x batch B take the step of one process with batch W x B. Rank 0 writes."""
import datetime
import glob
import json
import math
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
from safetensors.torch import save_model

from . import checkpoint, fast
from .cli import Logger, check, check_ranges, run
from .hub import load
from .lora import apply_lora, merge_lora, save_adapter
from .nf4 import quantize_nf4_

DIST_TIMEOUT = datetime.timedelta(seconds=120)  # a collective's wait for a peer: a dead rank ends the job, no hang
NOT_SETTINGS = ("out", "resume", "max_steps", "save_every", "log_every", "device", "compile")  # free on --resume


@dataclass
class TrainConfig:
    """The flags every training script shares; each script's Config adds its own and may change a default."""
    init: str = "smollm2-135m-instruct"  # start from: a preset (tiny, small), the alias, an HF/checkpoint dir, a .gguf
    out: str = ""  # output dir: checkpoint, adapter/, log.jsonl, metrics.json, train_state.pt
    max_steps: int = 200  # optimizer steps
    lr: float = 5e-5  # peak learning rate
    grad_clip: float = 1.0  # clip the global gradient norm to this (0 = off)
    max_len: int = 512  # max tokens per row (prompt + response: the response's tail is cut; the prompt must fit)
    seed: int = 0  # seeds every random draw: the data order (or the sampling), the LoRA init, dropout
    lora_rank: int = 16  # 0 = full fine-tune; > 0 = LoRA on every linear layer of the blocks (r 16, alpha 32: TRL)
    lora_alpha: float = 32.0  # LoRA scale alpha / rank
    nf4: bool = False  # QLoRA: freeze the base in 4-bit NF4 (needs --lora-rank)
    bf16: bool = False  # bf16 autocast for the model (log-probs and loss stay fp32)
    device: str = "auto"  # cpu, cuda, or auto
    compile: bool = False  # torch.compile RMSNorm, RoPE, SwiGLU and the log-prob kernels: less memory, ~20 s warmup
    resume: bool = False  # continue the run in --out from its train_state.pt
    log_every: int = 10  # progress line + log.jsonl row every N steps
    save_every: int = 0  # write train_state.pt every N steps, for --resume (0 = never)
    skip_nonfinite: bool = False  # skip (and count) steps with a non-finite loss instead of stopping


@dataclass
class DatasetConfig(TrainConfig):
    """The flags of the scripts that step through a dataset in batches: SFT, RM and DPO."""
    data: str = ""  # training JSONL
    eval_data: str = ""  # held-out JSONL of the same kind, for eval metrics (optional)
    batch_size: int = 4  # rows (pairs) per micro-batch on each rank
    grad_accum: int = 1  # micro-batches per step; global batch = batch_size * grad_accum * ranks
    warmup: int = 10  # linear warmup steps, then cosine decay to 10% of --lr
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    lora_dropout: float = 0.05  # dropout on the LoRA input
    eval_every: int = 0  # evaluate on --eval-data every N steps (0 = only at the end)


POSITIVE = ("max_steps", "lr", "max_len", "log_every", "batch_size", "grad_accum")  # of the shared flags
NON_NEGATIVE = ("grad_clip", "save_every", "lora_rank", "warmup", "weight_decay", "eval_every")


class TrainingError(Exception):
    """A run that cannot go on (e.g. a non-finite loss): one `error:` line, exit code 1, last checkpoint kept."""


def setup(cfg: TrainConfig):
    """Check the shared flags (nonsense is a one-line error, exit 2, before anything is loaded); join the process
    group when launched by torchrun; seed torch. -> (device, rank, world)."""
    check_ranges(cfg, [n for n in POSITIVE if hasattr(cfg, n)], [n for n in NON_NEGATIVE if hasattr(cfg, n)])
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device  # load checks
    check(not device.startswith("cuda") or torch.cuda.is_available(), "--device cuda: no CUDA device is available")
    if world > 1 and not dist.is_initialized():
        if device.startswith("cuda"):
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo", timeout=DIST_TIMEOUT)
    torch.manual_seed(cfg.seed)  # every random draw of the scripts comes from torch (CPU and CUDA)
    return device, rank, world


def shard(indices: list, rank: int, world: int) -> list:  # this rank's share of a global batch
    return indices[rank::world]


def batch_indices(step: int, global_batch: int, n: int, seed: int) -> list[int]:
    """The global batch of `step` (from 0): sample j of the run is item j % n of epoch j // n, in a seeded permutation
    per epoch, so resuming needs no iterator state."""
    return [int(torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + j // n))[j % n])
            for j in range(step * global_batch, (step + 1) * global_batch)]


def barrier():
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:  # summed over ranks (itself in a single process)
    if dist.is_initialized():
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM)  # SUM, never AVG: AVG can silently sum on gloo (pytorch #162338)
    return x


def all_reduce_dict(sums: dict, device) -> dict:  # {name: number} summed over ranks: metrics travel by name
    total = all_reduce_sum(torch.tensor([float(v) for v in sums.values()], dtype=torch.float64, device=device))
    return dict(zip(sums, total.tolist()))


def prepare_model(cfg: TrainConfig, device: str, score_head: bool = False):
    """Load --init (+ a reward head r(x, y) with score_head, unless it has one), NF4 base and LoRA optional (LoRA
    dropout 0 without a --lora-dropout flag: PPO); with --compile, the fused kernels of nanoalign.fast."""
    dropout = getattr(cfg, "lora_dropout", 0.0)
    check(0 <= dropout < 1, f"--lora-dropout must be in [0, 1), got {dropout}")
    check(not cfg.nf4 or cfg.lora_rank > 0, "--nf4 needs --lora-rank > 0 (QLoRA trains adapters on a frozen 4-bit base)")
    model, tok = load(cfg.init, device)
    n = model.cfg.max_position_embeddings
    check(cfg.max_len <= n, f"--max-len {cfg.max_len} exceeds the model's {n} positions")
    if score_head and model.score is None:
        model.add_score_head(seed=cfg.seed)
    if cfg.nf4:
        quantize_nf4_(model)  # leaves lm_head and score in full precision
    if cfg.lora_rank > 0:  # a reward head trains in full next to the adapters (PEFT's modules_to_save)
        apply_lora(model, cfg.lora_rank, cfg.lora_alpha, dropout, trainable=("score",) if score_head else ())
    return fast.compile_pointwise(model) if cfg.compile else model, tok


def autocast(bf16: bool, device):  # --bf16: the model's matmuls in bf16; log-probs and losses stay fp32
    return torch.autocast(torch.device(device).type, torch.bfloat16, enabled=bf16)


def make_optimizer(params, lr: float, weight_decay: float = 0.0):
    return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay, eps=1e-8)


def lr_at(step: int, max_steps: int, lr: float, warmup: int) -> float:  # step from 0: linear warmup, cosine to lr/10
    if step < warmup:
        return lr * (step + 1) / warmup
    frac = min((step - warmup) / max(1, max_steps - warmup), 1.0)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def step_or_skip(opt, params, loss, lr: float, step: int, cfg) -> float:
    """Sum the gradients over ranks, clip their norm to cfg.grad_clip (0 = off), step at `lr`; -> the norm. A
    non-finite loss or norm stops the run (train_state.pt stays intact), or with --skip-nonfinite returns nan."""
    norm = math.nan
    if math.isfinite(float(loss)):
        for p in params if dist.is_initialized() else ():
            if p.grad is not None:
                dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
        norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip or math.inf))  # the same on every rank
    if math.isfinite(norm):
        for group in opt.param_groups:
            group["lr"] = lr
        opt.step()
    opt.zero_grad(set_to_none=True)
    if math.isfinite(norm) or cfg.skip_nonfinite:
        return norm
    what = f"gradient norm ({norm})" if math.isfinite(float(loss)) else f"loss ({float(loss)})"
    raise TrainingError(f"non-finite {what} at step {step}; stopped, the last good checkpoint in {cfg.out} is "
                        "intact (use --resume, a lower --lr, or --skip-nonfinite)")


def prepare_out(out: str, cfg, resume: bool, rank: int = 0):
    """Refuse to mix runs in --out; rank -1 only checks, rank 0 also writes run.json and clears dead temporaries."""
    check(bool(out), "--out is required")
    check(not os.path.exists(out) or os.path.isdir(out), f"{out}: exists and is not a directory; choose a new --out")
    run_file, this = os.path.join(out, "run.json"), {k: v for k, v in vars(cfg).items() if k not in NOT_SETTINGS}
    if os.path.exists(run_file):
        try:
            with open(run_file) as f:
                prev = json.load(f)
        except (OSError, ValueError):
            prev = None
        check(isinstance(prev, dict), f"{run_file}: unreadable run record; choose a new --out")
        check(resume, f"{out}: already holds a run; pass --resume to continue it, or choose a new --out")
        diff = sorted(k for k in this if k in prev and prev[k] != this[k])
        check(not diff, f"{out}: --resume with different settings ({', '.join(diff)}) than the saved run")
    else:
        check(not resume, f"{out}: nothing to resume (no run.json)")
        check(not os.path.isdir(out) or not os.listdir(out), f"{out}: exists and is not empty; choose a new --out")
    if rank == 0:
        os.makedirs(out, exist_ok=True)
        checkpoint.write_json(run_file, this)
        for tmp in glob.glob(os.path.join(out, "*.tmp-*")):  # a killed run's half-written files (atomic_write's)
            os.remove(tmp)


def start_or_resume(cfg, model, opt, rank: int = 0, show=None) -> tuple[int, dict, Logger]:
    """Record the run in --out (rank 0), or with --resume restore what save_state wrote. -> (the step to start from,
    save_state's extra state, the run's Logger: on a resume it first cuts log.jsonl back to that step)."""
    barrier()
    if rank == 0:
        prepare_out(cfg.out, cfg, cfg.resume, rank)
        if getattr(cfg, "warmup", 0) > cfg.max_steps:
            peak = lr_at(cfg.max_steps - 1, cfg.max_steps, cfg.lr, cfg.warmup)
            print(f"warning: --warmup {cfg.warmup} outlasts --max-steps {cfg.max_steps}: the lr peaks at {peak:.3g}, "
                  f"not --lr {cfg.lr:g}", file=sys.stderr)
    st = {"step": 0, "extra": {}}
    if cfg.resume:
        st = checkpoint.load_train_state(cfg.out)
        unknown = model.load_state_dict(st["weights"], strict=False).unexpected_keys  # the trainable ones only
        check(not unknown, f"{cfg.out}/train_state.pt: parameters {unknown} do not exist in this model")
        opt.load_state_dict(st["optimizer"])
        checkpoint.set_rng_state(st["rng"])
    return st["step"], st["extra"], Logger(cfg.out, cfg.max_steps, enabled=rank == 0, start_step=st["step"], show=show)


def save_state(cfg, model, opt, step: int, extra: dict, rank: int = 0):
    """Every --save-every steps: trainable weights, optimizer, step, RNGs and the extra state (e.g. β), atomically."""
    if not cfg.save_every or step % cfg.save_every:
        return
    barrier()
    if rank == 0:
        weights = {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}
        checkpoint.save_train_state(cfg.out, {"step": step, "weights": weights, "optimizer": opt.state_dict(),
                                              "rng": checkpoint.rng_state(), "extra": extra})
    barrier()


def finish(out: str, model, tok, metrics: dict, rank: int = 0, lora: bool = False, heads: dict | None = None):
    """The final checkpoint, adapters merged (so transformers loads it), the adapter alone (PEFT), and any heads."""
    barrier()
    if rank == 0:
        if lora:
            save_adapter(model, os.path.join(out, "adapter"))
            merge_lora(model)
        checkpoint.save_checkpoint(out, model, tok)
        for name, head in (heads or {}).items():  # NAME.safetensors beside a plain causal LM (None: no such head)
            if head is not None:
                checkpoint.atomic_write(os.path.join(out, f"{name}.safetensors"), lambda tmp: save_model(head, tmp))
        checkpoint.write_json(os.path.join(out, "metrics.json"), metrics)
    barrier()
    if dist.is_initialized():
        dist.destroy_process_group()


def main_guard(main, cls):
    """cli.run, plus exit code 1 and one `error:` line for a training error or a dead peer rank (no traceback)."""
    try:
        return run(main, cls)
    except TrainingError as e:
        print(f"error: {e}", file=sys.stderr)
    except dist.DistError as e:  # a peer rank died, or hung past DIST_TIMEOUT
        first = (str(e).strip() or type(e).__name__).splitlines()[0]
        print(f"error: rank {dist.get_rank() if dist.is_initialized() else 0}: the process group failed ({first}); a "
              "peer rank died or timed out. The last train_state.pt in --out is intact: rerun with --resume",
              file=sys.stderr)
    sys.exit(1)


def seeded(*key) -> torch.Generator:  # e.g. (seed, step): the run's randomness is a pure function of the step
    return torch.Generator().manual_seed(hash(key) % 2**62)


def progress(rank: int, text: str):  # a status line, rewritten in place on a terminal; the next log line covers it
    if rank == 0 and sys.stdout.isatty():
        print(f"\r\033[K{text}\r", end="", flush=True)


def global_mean_std(x) -> tuple[float, float]:  # of x (B,) over every rank's entries; std 1 when all are equal
    m = all_reduce_sum(torch.stack([x.sum(), x.square().sum(), torch.tensor(float(len(x)), device=x.device)]).double())
    mean, var = float(m[0] / m[2]), float(m[1] / m[2] - (m[0] / m[2]) ** 2)
    return mean, math.sqrt(var) if var > 1e-12 else 1.0


def global_means(minibatches: list[dict], n: int, device, **per_item) -> dict:
    """Metrics as one process would log them: each rank's shares (a minibatch metric's mean over minibatches, a
    per-item tensor's sum / all n items; None: not logged) summed over ranks; loss and grad_norm are global already."""
    shares = {key: sum(m[key] for m in minibatches) / len(minibatches) for key in minibatches[0]}
    whole = {key: shares.pop(key) for key in ("loss", "grad_norm")}
    shares.update({key: float(v.double().sum()) / n for key, v in per_item.items() if v is not None})
    return {**all_reduce_dict(dict(sorted(shares.items())), device), **whole}

