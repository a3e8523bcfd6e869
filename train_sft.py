"""Supervised fine-tuning (SFT) on chat demonstrations: stage 1 of RLHF (Ouyang et al. 2022, "InstructGPT", §3.5).

The loss is the negative log-likelihood of the assistant's tokens given everything before them:

    L = −(1/N) Σ_rows Σ_t mask_t · log π(y_t | y_<t)        N = number of target tokens in the GLOBAL batch

mask_t is 1 on assistant content and its closing <|im_end|> (the model must learn to stop), 0 on the system/user
turns and on padding. N counts targets over all micro-batches and ranks, so batch 8 × accum 1, batch 1 × accum 8 and
2 ranks × batch 4 take the same step; a mean per micro-batch would not (transformers #34191, pitfall 7).
Log-probs come from nanoalign.logprobs, chunked from hidden states in fp32: the (B, T, V) logits are never built.

Run:
    python -m nanoalign.tasks make --out data --seed 0
    python train_sft.py --data data/sft.jsonl --out out/sft                                # full fine-tune
    python train_sft.py --data data/sft.jsonl --out out/sft --lora-rank 16 --lr 2e-4       # LoRA
    python train_sft.py --data data/sft.jsonl --out out/sft --lora-rank 16 --lr 2e-4 --nf4 # QLoRA
    torchrun --nproc_per_node=2 train_sft.py --data data/sft.jsonl --out out/sft           # data parallel

Simplifications: one epoch is a seeded permutation and batches are drawn by step, so the data position is a pure
function of the step (resume needs no iterator state); data parallelism is a hand-rolled all-reduce of the
gradients after the micro-batches (no DDP wrapper, no gradient/communication overlap); packing is first-fit in
data order and never splits a conversation.
"""
import functools
import math
import os
import time
from dataclasses import dataclass

import torch

from nanoalign import loop
from nanoalign.cli import Logger, check
from nanoalign.data import collate_sft, read_sft, tokenize_sft
from nanoalign.logprobs import token_logprobs
from nanoalign.losses import sft_loss
from nanoalign.model import compile_pointwise
from nanoalign.packing import collate_packed, pack_sft


@dataclass
class Config:
    """Supervised fine-tuning on chat demonstrations (loss on the assistant turns)."""
    init: str = "smollm2-135m-instruct"  # start from: a preset (tiny, small), the alias, an HF/checkpoint dir, a .gguf
    data: str = ""  # SFT JSONL: {"messages": [...]} or {"prompt": ..., "completion": ...} per line
    out: str = ""  # output dir: checkpoint, adapter/, log.jsonl, metrics.json, train_state.pt
    eval_data: str = ""  # held-out SFT JSONL for an eval loss (optional)
    max_steps: int = 200  # optimizer steps
    batch_size: int = 4  # rows per micro-batch on each rank
    grad_accum: int = 1  # micro-batches per step; global batch = batch_size * grad_accum * ranks
    lr: float = 2e-5  # peak learning rate (LoRA usually wants ~2e-4)
    warmup: int = 10  # linear warmup steps, then cosine decay to 10% of --lr
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    grad_clip: float = 1.0  # clip the global gradient norm to this (0 = off)
    max_len: int = 512  # max tokens per row (per packed row with --pack)
    truncate: str = "drop"  # rows over --max-len: drop them, or left (cut the oldest prompt tokens)
    train_on_prompt: bool = False  # also train on system/user tokens (default: assistant turns only)
    pack: bool = False  # pack several conversations per row; attention and positions stay per conversation
    seed: int = 0  # seeds the data order, LoRA init and dropout
    lora_rank: int = 0  # 0 = full fine-tune; > 0 = LoRA on every linear layer of the blocks
    lora_alpha: float = 32.0  # LoRA scale alpha / rank
    lora_dropout: float = 0.05  # dropout on the LoRA input
    nf4: bool = False  # QLoRA: freeze the base in 4-bit NF4 (needs --lora-rank)
    bf16: bool = False  # bf16 autocast for the model (log-probs and loss stay fp32); off: not measured faster on CPU
    device: str = "auto"  # cpu, cuda, or auto
    compile: bool = False  # torch.compile RMSNorm, RoPE, SwiGLU and the log-prob kernels: less memory, ~20 s warmup
    resume: bool = False  # continue the run in --out from its train_state.pt
    log_every: int = 10  # progress line + log.jsonl row every N steps
    save_every: int = 0  # write train_state.pt every N steps, for --resume (0 = never)
    eval_every: int = 0  # eval loss every N steps with --eval-data (0 = only at the end)
    skip_nonfinite: bool = False  # skip (and count) steps with a non-finite loss instead of stopping


def batch_loss(model, batch, num_tokens, cfg, device):
    """Summed token NLL of one micro-batch / the global target count (so the micro-batch losses add up)."""
    b = {k: v.to(device) for k, v in batch.items()}
    with torch.autocast(torch.device(device).type, torch.bfloat16, enabled=cfg.bf16):
        logprobs = token_logprobs(model, b["input_ids"], b["attention_mask"], b["loss_mask"],
                                  position_ids=b.get("position_ids"),
                                  compiled=cfg.compile)  # (B, T-1), fp32 even under autocast
    return sft_loss(logprobs, b["loss_mask"][:, 1:], num_tokens)  # target t+1 is predicted at position t


def evaluate(model, examples, collate, cfg, device, rank, world) -> float:
    """Token-mean NLL over the held-out rows (each rank takes a share; sums are all-reduced)."""
    model.eval()
    mine = loop.shard(list(range(len(examples))), rank, world)
    total = torch.zeros(2, device=device)  # [summed NLL, target tokens]
    with torch.no_grad():
        for k in range(0, len(mine), cfg.batch_size):
            batch = collate([examples[i] for i in mine[k:k + cfg.batch_size]])
            total[0] += batch_loss(model, batch, 1.0, cfg, device)
            total[1] += batch["loss_mask"][:, 1:].sum()
    model.train()
    total = loop.all_reduce_sum(total)
    return float(total[0] / total[1])


def main(cfg: Config) -> dict:
    # 0. flags: nonsense values are one-line errors (exit 2) before anything is loaded
    for name in ("max_steps", "batch_size", "grad_accum", "max_len", "log_every", "lr"):
        check(getattr(cfg, name) > 0, f"--{name.replace('_', '-')} must be > 0, got {getattr(cfg, name)}")
    for name in ("warmup", "save_every", "eval_every", "weight_decay", "grad_clip"):
        check(getattr(cfg, name) >= 0, f"--{name.replace('_', '-')} must be >= 0, got {getattr(cfg, name)}")
    check(0 <= cfg.lora_dropout < 1, f"--lora-dropout must be in [0, 1), got {cfg.lora_dropout}")
    check(cfg.truncate in ("drop", "left"), f"--truncate must be drop or left, got {cfg.truncate!r}")
    device, rank, world = loop.setup(cfg.seed, cfg.device)

    # 1. data: validated rows (bad input -> `FILE:LINE: what`); --out is checked now but written only when every
    #    input has passed (rank -1: check only), so a bad run leaves nothing behind
    rows = read_sft(cfg.data)
    eval_rows = read_sft(cfg.eval_data) if cfg.eval_data else []
    loop.prepare_out(cfg.out, cfg, cfg.resume, rank=-1)

    # 2. model: full fine-tune, LoRA, or QLoRA (NF4 base + LoRA), and its optimizer
    model, tok = loop.prepare_model(cfg.init, device, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.nf4)
    check(cfg.max_len <= model.cfg.max_position_embeddings,
          f"--max-len {cfg.max_len} exceeds the model's {model.cfg.max_position_embeddings} positions")
    model.train()
    if cfg.compile:  # fused RMSNorm/RoPE/SwiGLU (the matmuls and attention stay eager)
        compile_pointwise()
    params = loop.trainable(model)
    opt = loop.make_optimizer(params, cfg.lr, cfg.weight_decay)

    # 3. tokenize with the chat template: (ids, loss_mask) per conversation; optionally pack them into rows
    examples = tokenize_sft(tok, rows, cfg.max_len, cfg.train_on_prompt, cfg.truncate, cfg.data, rank == 0)
    if cfg.pack:
        examples = pack_sft(examples, cfg.max_len)
    collate = functools.partial(collate_packed if cfg.pack else collate_sft, pad_id=tok.pad_id)
    eval_examples = tokenize_sft(tok, eval_rows, cfg.max_len, False, cfg.truncate, cfg.eval_data,
                                 rank == 0) if eval_rows else []
    eval_collate = functools.partial(collate_sft, pad_id=tok.pad_id)

    # 4. record the run in --out (rank 0, after every rank has checked it), or resume it: trainable weights,
    #    optimizer, RNGs and the step; the data position follows from the step
    st = loop.start_or_resume(cfg, model, opt, rank)
    start, skipped = st["step"], st["extra"].get("skipped", 0)

    logger = Logger(cfg.out, cfg.max_steps, enabled=rank == 0, start_step=start)
    global_batch = cfg.batch_size * cfg.grad_accum * world
    inject = int(os.environ.get("NANOALIGN_INJECT_NAN_STEP", 0))  # fault injection for the tests (1-based step)
    first_loss = loss = eval_loss = None
    seen, t_log = 0.0, time.time()
    for step in range(start, cfg.max_steps):
        # 5. this rank's share of the global batch, as micro-batches
        idx = loop.shard(loop.batch_indices(step, global_batch, len(examples), cfg.seed), rank, world)
        micro = [collate([examples[i] for i in idx[k:k + cfg.batch_size]]) for k in range(0, len(idx), cfg.batch_size)]

        # 6. the loss denominator: target tokens over ALL micro-batches and ranks (and the real tokens, for tok/s)
        counts = loop.all_reduce_sum(torch.tensor([float(sum(m["loss_mask"][:, 1:].sum() for m in micro)),
                                                   float(sum(m["attention_mask"].sum() for m in micro))], device=device))
        seen += float(counts[1])

        # 7. forward + backward per micro-batch; the gradients add up to the gradient of the global token mean
        loss_sum = torch.zeros((), device=device)
        for m in micro:
            mloss = batch_loss(model, m, counts[0], cfg, device)
            if step + 1 == inject:
                mloss = mloss * float("nan")
            mloss.backward()
            loss_sum += mloss.detach()
        loss_t = loop.all_reduce_sum(loss_sum)

        # 8. a non-finite loss stops the run (the last train_state.pt stays intact), or with --skip-nonfinite is
        #    skipped; otherwise sum the gradients over ranks, clip, and step at the scheduled lr
        lr = loop.lr_at(step, cfg.max_steps, cfg.lr, cfg.warmup)
        grad_norm = loop.step_or_skip(opt, params, loss_t, lr, step + 1, cfg)  # nan: skipped
        if math.isfinite(grad_norm):
            loss = float(loss_t)
            first_loss = loss if first_loss is None else first_loss
        else:
            skipped += 1

        # 9. eval, log, save
        metrics = {}
        if eval_examples and cfg.eval_every and (step + 1) % cfg.eval_every == 0:
            eval_loss = metrics["eval_loss"] = evaluate(model, eval_examples, eval_collate, cfg, device, rank, world)
        if (step + 1) % cfg.log_every == 0 or step == start or step + 1 == cfg.max_steps or metrics:
            now = time.time()
            logger.log(step + 1, loss=float(loss_t), lr=lr, grad_norm=grad_norm, tokens_per_s=seen / (now - t_log),
                       skipped=skipped, **metrics)
            seen, t_log = 0.0, now
        if cfg.save_every and (step + 1) % cfg.save_every == 0:
            loop.save_state(cfg.out, model, opt, step + 1, {"skipped": skipped}, rank)

    # 10. final eval, then the merged checkpoint (+ adapter/ with LoRA) and metrics.json
    if eval_examples and not (cfg.eval_every and cfg.max_steps % cfg.eval_every == 0):
        eval_loss = evaluate(model, eval_examples, eval_collate, cfg, device, rank, world)
    result = {"loss": loss, "first_loss": first_loss, "eval_loss": eval_loss, "steps": cfg.max_steps,
              "skipped_steps": skipped, "train_rows": len(examples)}
    loop.finish(cfg.out, model, tok, result, rank, lora=cfg.lora_rank > 0)
    return result


if __name__ == "__main__":
    loop.main_guard(main, Config)
