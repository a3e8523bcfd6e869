"""Supervised fine-tuning (SFT) on chat demonstrations: stage 1 of RLHF (Ouyang et al. 2022, "InstructGPT", §3.5).

The loss is the negative log-likelihood of the assistant's tokens given everything before them:

    L = −(1/N) Σ_rows Σ_t mask_t · log π(y_t | y_<t)        N = number of target tokens in the GLOBAL batch

mask_t is 1 on assistant content and its closing <|im_end|> (the model must learn to stop), 0 on the system/user
turns and on padding. N counts targets over all micro-batches and ranks, so batch 8 × accum 1, batch 1 × accum 8 and
2 ranks × batch 4 take the same step; a mean per micro-batch would not (transformers #34191).

Run:
    python -m nanoalign.tasks make --out data --seed 0
    python train_sft.py --data data/sft.jsonl --out out/sft                                # full fine-tune
    python train_sft.py --data data/sft.jsonl --out out/sft --lora-rank 16 --lr 2e-4 [--nf4] # LoRA [QLoRA]
    torchrun --nproc_per_node=2 train_sft.py --data data/sft.jsonl --out out/sft           # data parallel

Simplifications: the data position is a pure function of the step (a seeded permutation per epoch: resume needs
no iterator state); data parallelism is an all-reduce of the gradients after the micro-batches (no DDP wrapper, no
overlap of communication and compute); --pack is first-fit in data order and never splits a conversation.
"""
import math
import time
from dataclasses import dataclass

import torch

from nanoalign import loop
from nanoalign.data import collate_sft, read_sft, tokenize_sft
from nanoalign.logprobs import token_logprobs
from nanoalign.losses import sft_loss
from nanoalign.packing import collate_packed, pack_sft


@dataclass
class Config(loop.DatasetConfig):
    """Supervised fine-tuning on chat demonstrations (loss on the assistant turns)."""
    data: str = ""  # SFT JSONL: {"messages": [...]} or {"prompt": ..., "completion": ...} per line
    lr: float = 2e-5  # peak learning rate (LoRA usually wants ~2e-4)
    lora_rank: int = 0  # 0 = full fine-tune; > 0 = LoRA on every linear layer of the blocks
    max_len: int = 512  # max tokens per conversation (a longer one: --truncate), and per packed row with --pack
    truncate: str = "drop"  # {drop, left}: rows over --max-len are dropped, or lose their oldest prompt tokens
    train_on_prompt: bool = False  # also train on the system/user tokens, not only on the assistant turns
    pack: bool = False  # pack several conversations per row; attention and positions stay per conversation


def batch_loss(model, batch, num_tokens, cfg, device):
    """−Σ mask_t · log π(y_t | y_<t) / N for one micro-batch: divided by the GLOBAL N, the micro-batches add up."""
    b = {k: v.to(device) for k, v in batch.items()}
    with loop.autocast(cfg.bf16, device):
        logprobs = token_logprobs(model, b["input_ids"], b["attention_mask"], b["loss_mask"],
                                  position_ids=b.get("position_ids"), compiled=cfg.compile)  # (B, T-1), fp32
    return sft_loss(logprobs, b["loss_mask"][:, 1:], num_tokens)  # target t+1 is predicted at position t


def main(cfg: Config) -> dict:
    # 0. flags: nonsense values are one-line errors (exit 2) before anything is loaded; this process's device, rank
    device, rank, world = loop.setup(cfg)

    # 1. data: validated rows (bad input -> `FILE:LINE: what`); --out is checked now but written only in step 4
    rows = read_sft(cfg.data)
    eval_rows = read_sft(cfg.eval_data, "--eval-data") if cfg.eval_data else []
    loop.prepare_out(cfg.out, cfg, cfg.resume, rank=-1)

    # 2. model: full fine-tune, LoRA, or QLoRA (NF4 base + LoRA); AdamW over the trainable weights
    model, tok = loop.prepare_model(cfg, device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = loop.make_optimizer(params, cfg.lr, cfg.weight_decay)

    # 3. tokenize with the chat template: (ids, loss_mask) per conversation; --pack puts several in a row
    examples = tokenize_sft(tok, rows, cfg.max_len, cfg.train_on_prompt, cfg.truncate, cfg.data, rank == 0)
    eval_examples = tokenize_sft(tok, eval_rows, cfg.max_len, False, cfg.truncate, cfg.eval_data,
                                 rank == 0) if eval_rows else []
    examples, collate = (pack_sft(examples, cfg.max_len), collate_packed) if cfg.pack else (examples, collate_sft)
    lengths = [sum(len(ids) for ids, _ in row) if cfg.pack else len(row[0]) for row in examples]  # for tokens/s

    # 4. record the run in --out, or resume it: trainable weights, optimizer, RNGs, step (the data position follows)
    start, extra, logger = loop.start_or_resume(cfg, model, opt, rank)
    skipped = extra.get("skipped", 0)
    global_batch = cfg.batch_size * cfg.grad_accum * world
    tokens, t_log, loss, first_loss, eval_loss = 0.0, time.time(), None, None, None
    for step in range(start, cfg.max_steps):
        # 5. this rank's share of the global batch as micro-batches, and N: the target tokens of the GLOBAL batch
        idx = loop.shard(loop.batch_indices(step, global_batch, len(examples), cfg.seed), rank, world)
        micro = [collate([examples[i] for i in idx[k:k + cfg.batch_size]], tok.pad_id)
                 for k in range(0, len(idx), cfg.batch_size)]
        counts = loop.all_reduce_dict({"N": sum(float(m["loss_mask"][:, 1:].sum()) for m in micro),
                                       "tokens": sum(lengths[i] for i in idx)}, device)
        tokens += counts["tokens"]

        # 6. forward + backward per micro-batch: L = −(1/N) Σ mask_t · log π(y_t | y_<t), accumulated in the grads
        loss_sum = torch.zeros((), device=device)
        for m in micro:
            micro_loss = batch_loss(model, m, counts["N"], cfg, device)
            micro_loss.backward()
            loss_sum += micro_loss.detach()
        step_loss = loop.all_reduce_sum(loss_sum)

        # 7. the optimizer step at the scheduled lr (a non-finite loss stops the run, or is skipped: grad_norm nan)
        lr = loop.lr_at(step, cfg.max_steps, cfg.lr, cfg.warmup)
        grad_norm = loop.step_or_skip(opt, params, step_loss, lr, step + 1, cfg)
        if math.isfinite(grad_norm):
            loss, first_loss = float(step_loss), float(step_loss) if first_loss is None else first_loss
        skipped += not math.isfinite(grad_norm)

        # 8. eval (every --eval-every steps and at the end), log, save
        metrics, last = {}, step + 1 == cfg.max_steps
        if eval_examples and (last or cfg.eval_every and (step + 1) % cfg.eval_every == 0):
            model.eval()  # the token-mean NLL of the held-out rows, each rank on its share
            mine, nll, n = loop.shard(eval_examples, rank, world), 0.0, 0.0
            with torch.no_grad():
                for k in range(0, len(mine), cfg.batch_size):
                    b = collate_sft(mine[k:k + cfg.batch_size], tok.pad_id)
                    nll += float(batch_loss(model, b, 1.0, cfg, device))  # summed over the tokens: N = 1
                    n += float(b["loss_mask"][:, 1:].sum())
            model.train()
            total = loop.all_reduce_dict({"nll": nll, "n": n}, device)
            eval_loss = metrics["eval_loss"] = total["nll"] / total["n"]
        if (step + 1) % cfg.log_every == 0 or step == start or last or metrics:
            logger.log(step + 1, loss=float(step_loss), lr=lr, grad_norm=grad_norm,
                       tokens_per_s=tokens / (time.time() - t_log), skipped=skipped, **metrics)
            tokens, t_log = 0.0, time.time()
        loop.save_state(cfg, model, opt, step + 1, {"skipped": skipped}, rank)

    # 9. the merged checkpoint (+ adapter/ with LoRA) and metrics.json
    result = {"loss": loss, "first_loss": first_loss, "eval_loss": eval_loss, "steps": cfg.max_steps,
              "skipped_steps": skipped, "train_rows": len(examples)}
    loop.finish(cfg.out, model, tok, result, rank, lora=cfg.lora_rank > 0)
    return result


if __name__ == "__main__":
    loop.main_guard(main, Config)
