"""Reward model: a scalar head on the SFT model, trained on preference pairs (stage 2 of RLHF).

Ouyang et al. 2022 ("InstructGPT", §3.5, eq. 1), after Stiennon et al. 2020 and Bradley & Terry 1952:

    r(x, y) = w · h_last(x, y)                       the score head, read at the response's LAST REAL token
    L = −log σ(r(x, y_c) − r(x, y_r) − m) + λ·(r(x, y_c) + r(x, y_r))²    averaged over the GLOBAL batch of pairs

m is --margin (Llama 2 uses a per-pair margin from the annotators' rating gap; here one constant); the second term is
--center-rewards (Eisenstein et al. 2023, λ ≈ 0.01): BT only sees differences, so without it the rewards drift by an
arbitrary constant, which a PPO value head then has to chase. The head is an nn.Linear(d, 1) with std 1/√(d+1)
(lm-human-preferences), trained in full next to the LoRA adapters, on the SFT model (RMs that start elsewhere stall
near 50% accuracy). The RM is saved as an HF LlamaForSequenceClassification (score.weight, num_labels 1).

Run (the data and the SFT model as in train_sft.py; torchrun as there):
    python train_rm.py --init out/sft --data data/prefs.jsonl --eval-data data/eval_prefs.jsonl --out out/rm
    python train_rm.py ... --lora-rank 0 --lr 1e-5                      # full fine-tune instead of LoRA

Simplifications: one scalar per sequence; a single constant margin; data order and all-reduce as in train_sft.py.
The saved pad_token_id is not <|im_end|>: transformers reads the score at the last token that is not pad_token_id,
and every response ends with <|im_end|>, which is where this RM reads it.
"""
import math
import time
from collections import Counter
from dataclasses import dataclass

import torch

from nanoalign import loop
from nanoalign.cli import check_ranges
from nanoalign.data import collate_pairs, read_prefs, tokenize_prefs
from nanoalign.losses import bradley_terry_loss
from nanoalign.packing import collate_shared, pair_rewards


@dataclass
class Config(loop.DatasetConfig):
    """Bradley-Terry reward model on preference pairs (a scalar head on the SFT model)."""
    data: str = ""  # preference JSONL: prompt/chosen/rejected as strings or message lists, or HH-style chosen/rejected
    batch_size: int = 8  # pairs per micro-batch on each rank (2x rows in the forward pass)
    lr: float = 1e-4  # peak lr: 5e-5..1e-4 suits LoRA RMs (the score head trains in full); ~1e-5 for a full fine-tune
    margin: float = 0.0  # m in -log sigmoid(r_c - r_r - m): chosen must win by at least this much
    center_rewards: float = 0.0  # lambda of lambda*(r_c + r_r)^2, pulls rewards toward mean 0 (0.01 is typical)
    share_prompt: bool = True  # a pair is ONE row [prompt | chosen | rejected]: the prompt runs once for both


def rewards_of(model, batch, device, bf16=False):
    """(r(x, y_c), r(x, y_r)), each (B,) fp32: the score head at each response's last token, either batch layout."""
    with loop.autocast(bf16, device):
        return pair_rewards(model, {k: v.to(device) for k, v in batch.items()})


def pair_stats(chosen_rewards, rejected_rewards) -> Counter:
    """Sums over pairs, which add up over micro-batches and ranks: see summarize()."""
    r, diff = torch.cat([chosen_rewards, rejected_rewards]).detach(), (chosen_rewards - rejected_rewards).detach()
    return Counter(pairs=len(diff), correct=float((diff > 0).sum()), margin=float(diff.sum()), reward=float(r.sum()),
                   reward_sq=float((r * r).sum()))


def summarize(stats: Counter, device, prefix: str = "") -> dict:
    """Pairwise accuracy (r_c > r_r), mean margin r_c − r_r, and the mean and std of all rewards, over all ranks."""
    s = loop.all_reduce_dict({k: stats[k] for k in ("pairs", "correct", "margin", "reward", "reward_sq")}, device)
    n = max(s["pairs"], 1.0)
    mean, mean_sq = s["reward"] / (2 * n), s["reward_sq"] / (2 * n)  # two rewards per pair
    return {f"{prefix}accuracy": s["correct"] / n, f"{prefix}margin": s["margin"] / n,
            f"{prefix}reward_mean": mean, f"{prefix}reward_std": max(mean_sq - mean * mean, 0.0) ** 0.5}


def main(cfg: Config) -> dict:
    # 0. flags: nonsense values are one-line errors (exit 2) before anything is loaded; this process's device, rank
    check_ranges(cfg, non_negative=("center_rewards",))
    device, rank, world = loop.setup(cfg)

    # 1. data: validated rows (bad input -> `FILE:LINE: what`); --out is checked now but written only in step 4
    rows = read_prefs(cfg.data)
    eval_rows = read_prefs(cfg.eval_data, "--eval-data") if cfg.eval_data else []
    loop.prepare_out(cfg.out, cfg, cfg.resume, rank=-1)

    # 2. model: the SFT model + a fresh score head (an RM checkpoint keeps its own); NF4 base and LoRA optional
    model, tok = loop.prepare_model(cfg, device, score_head=True)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = loop.make_optimizer(params, cfg.lr, cfg.weight_decay)

    # 3. tokenize: prompt + response ids; a pair collates into ONE row (or chosen rows, then rejected rows)
    examples = tokenize_prefs(tok, rows, cfg.max_len, cfg.data, rank == 0)
    eval_examples = tokenize_prefs(tok, eval_rows, cfg.max_len, cfg.eval_data, rank == 0) if eval_rows else []

    def collate(pairs):
        return (collate_shared if cfg.share_prompt else collate_pairs)(pairs, tok.pad_id, cfg.max_len)
    lengths = [len(e["prompt"]) + len(e["chosen"]) + len(e["rejected"]) for e in examples]  # for tokens/s

    # 4. record the run in --out, or resume it: trainable weights (adapters + head), optimizer, RNGs, step
    start, extra, logger = loop.start_or_resume(cfg, model, opt, rank)
    skipped = extra.get("skipped", 0)
    global_batch = cfg.batch_size * cfg.grad_accum * world
    stats, losses, tokens, t_log, train_metrics, eval_metrics = Counter(), [], 0.0, time.time(), {}, {}
    for step in range(start, cfg.max_steps):
        # 5. this rank's share of the global batch of pairs as micro-batches, and the pairs of the GLOBAL batch
        idx = loop.shard(loop.batch_indices(step, global_batch, len(examples), cfg.seed), rank, world)
        micro = [[examples[i] for i in idx[k:k + cfg.batch_size]] for k in range(0, len(idx), cfg.batch_size)]
        tokens += loop.all_reduce_dict({"tokens": sum(lengths[i] for i in idx)}, device)["tokens"]

        # 6. forward + backward per micro-batch: the summed pair losses / the global pair count add up exactly
        loss_sum = torch.zeros((), device=device)
        for pairs in micro:
            chosen_rewards, rejected_rewards = rewards_of(model, collate(pairs), device, cfg.bf16)  # (B,), (B,)
            # −log σ(r(x, y_c) − r(x, y_r) − m) + λ·(r(x, y_c) + r(x, y_r))², summed / the global pair count
            loss = bradley_terry_loss(chosen_rewards, rejected_rewards, cfg.margin, cfg.center_rewards)
            loss = loss.sum() / global_batch
            loss.backward()
            loss_sum += loss.detach()
            stats.update(pair_stats(chosen_rewards, rejected_rewards))
        step_loss = loop.all_reduce_sum(loss_sum)

        # 7. the optimizer step at the scheduled lr (a non-finite loss stops the run, or is skipped: grad_norm nan)
        lr = loop.lr_at(step, cfg.max_steps, cfg.lr, cfg.warmup)
        grad_norm = loop.step_or_skip(opt, params, step_loss, lr, step + 1, cfg)
        if math.isfinite(grad_norm):
            losses.append(float(step_loss))
        skipped += not math.isfinite(grad_norm)

        # 8. eval (every --eval-every steps and at the end), log (training metrics since the last line), save
        metrics, last = {}, step + 1 == cfg.max_steps
        if eval_examples and (last or cfg.eval_every and (step + 1) % cfg.eval_every == 0):
            model.eval()  # each rank scores its share of the held-out pairs
            mine, eval_stats = loop.shard(eval_examples, rank, world), Counter()
            with torch.no_grad():
                for exs in (mine[k:k + cfg.batch_size] for k in range(0, len(mine), cfg.batch_size)):
                    eval_stats.update(pair_stats(*rewards_of(model, collate(exs), device, cfg.bf16)))
            model.train()
            metrics = eval_metrics = summarize(eval_stats, device, "eval_")
        if (step + 1) % cfg.log_every == 0 or step == start or last or metrics:
            train_metrics = summarize(stats, device)
            logger.log(step + 1, loss=float(step_loss), **train_metrics, lr=lr, grad_norm=grad_norm,
                       tokens_per_s=tokens / (time.time() - t_log), skipped=skipped, **metrics)
            stats, tokens, t_log = Counter(), 0.0, time.time()
        loop.save_state(cfg, model, opt, step + 1, {"skipped": skipped}, rank)

    # 9. the merged checkpoint as an HF LlamaForSequenceClassification (+ adapter/ with LoRA) and metrics.json
    result = {"loss": losses[-1] if losses else None, "first_loss": losses[0] if losses else None, **train_metrics,
              **eval_metrics, "steps": cfg.max_steps, "skipped_steps": skipped, "train_pairs": len(examples)}
    loop.finish(cfg.out, model, tok, result, rank, lora=cfg.lora_rank > 0)
    return result


if __name__ == "__main__":
    loop.main_guard(main, Config)
