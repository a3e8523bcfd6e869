"""Direct Preference Optimization and its family: preference tuning without a reward model or sampling.

Rafailov et al. 2023 show that the policy is its own reward model, r(x, y) = β·log π(y|x)/π_ref(y|x), so (eq. 7)

    L_DPO = −log σ(β·[(log π(y_w|x) − log π_ref(y_w|x)) − (log π(y_l|x) − log π_ref(y_l|x))])

with log π(y|x) the SUM of the response's token log-probs, y_w the chosen and y_l the rejected response; --loss picks
a relative (nanoalign/losses.py). π_ref is the policy with its LoRA adapter disabled: exactly the SFT model, as each
stage saves a merged checkpoint. A pair runs as one row [prompt | chosen | rejected] (nanoalign/packing.py), so the
prompt's forward and backward run once for both responses.

Run (the data and the SFT model as in train_sft.py; torchrun as there):
    python train_dpo.py --init out/sft --data data/prefs.jsonl --eval-data data/eval_prefs.jsonl --out out/dpo
    python train_dpo.py ... --loss ipo --beta 0.5                     # or sigmoid cdpo robust simpo orpo kto
    python train_dpo.py ... --lora-rank 0 --lr 5e-7 --precompute-ref  # full fine-tune, no reference copy

Simplifications: data order and data parallelism as in train_sft.py; KTO's z0 is estimated per micro-batch on each
rank (TRL gathers it over ranks); no reference-model syncing (TR-DPO), no per-pair margins.
"""
import copy
import math
import time
from collections import Counter
from dataclasses import dataclass, replace

import torch

from nanoalign import loop
from nanoalign.cli import check, check_ranges
from nanoalign.data import collate_pairs, collate_unpaired, read_kto, read_prefs, tokenize_prefs
from nanoalign.logprobs import sequence_logprobs
from nanoalign.lora import disable_adapter
from nanoalign.losses import dpo_loss, ipo_loss, kto_loss, orpo_loss, robust_dpo_loss, simpo_loss
from nanoalign.packing import collate_shared, pair_lengths, pair_logprobs

REFERENCE_FREE = ("simpo", "orpo")  # losses that need no π_ref


@dataclass
class Config(loop.DatasetConfig):
    """DPO-family preference tuning: the policy against its own adapter-disabled self as the reference."""
    data: str = ""  # preference JSONL (prompt/chosen/rejected, conversational, HH-style); kto also takes "label" rows
    loss: str = "sigmoid"  # {sigmoid, cdpo, robust, ipo, simpo, orpo, kto}: sigmoid is DPO
    beta: float = 0.1  # β: KL strength of DPO/IPO/KTO (TRL, OpenRLHF, torchtune); SimPO's reward scale (use 2-2.5)
    label_smoothing: float = 0.0  # ε: assumed fraction of flipped labels (sigmoid, cdpo, robust, simpo)
    simpo_gamma: float = 0.5  # γ: SimPO's target reward margin
    orpo_lambda: float = 0.1  # λ: weight of ORPO's odds-ratio term next to the chosen NLL
    rpo_alpha: float = 0.0  # α: + α·NLL(y_w), the chosen response's token-average NLL (RPO; TRL's rpo_alpha)
    precompute_ref: bool = False  # reference log-probs computed once before training; no reference model kept
    share_prompt: bool = True  # a pair is ONE row [prompt | chosen | rejected]: the prompt runs once for both
    lr: float = 5e-5  # peak learning rate for LoRA (r 16 moves the rewards in ~100 steps); full fine-tune: ~5e-7
    lora_dropout: float = 0.0  # 0: dropout would make π differ from π_ref at step 0 (TRL disables it for DPO)


def pair_losses(model, ref_model, batch, exs, cfg):
    """B pairs -> (losses, chosen_rewards, rejected_rewards), each (B,). As Mitchell's concatenated_forward, ONE forward
    gives log π(y|x) of chosen and rejected: for the policy, then (no gradient) for π_ref; then --loss."""
    policy_chosen_logps, policy_rejected_logps = pair_logprobs(model, batch, cfg.compile)
    reference_chosen_logps = reference_rejected_logps = None
    if cfg.precompute_ref and cfg.loss not in REFERENCE_FREE:  # stored in each example by main's step 3
        reference_chosen_logps, reference_rejected_logps = torch.tensor([e["ref_logps"] for e in exs],
                                                                        device=policy_chosen_logps.device).T
    elif cfg.loss not in REFERENCE_FREE:
        with torch.no_grad(), disable_adapter(ref_model):  # π_ref: the policy without its LoRA adapter (or a copy)
            reference_chosen_logps, reference_rejected_logps = pair_logprobs(ref_model, batch, cfg.compile)
    chosen_lengths, rejected_lengths = pair_lengths(batch)  # IPO (as TRL does it), SimPO, ORPO: per-token averages
    policy_chosen_avg = policy_chosen_logps / chosen_lengths
    policy_rejected_avg = policy_rejected_logps / rejected_lengths
    if cfg.loss in ("sigmoid", "cdpo", "robust"):
        losses, chosen_rewards, rejected_rewards = (robust_dpo_loss if cfg.loss == "robust" else dpo_loss)(
            policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, cfg.beta,
            cfg.label_smoothing)
    elif cfg.loss == "ipo":
        losses, chosen_rewards, rejected_rewards = ipo_loss(policy_chosen_avg, policy_rejected_avg,
            reference_chosen_logps / chosen_lengths, reference_rejected_logps / rejected_lengths, cfg.beta)
    elif cfg.loss == "simpo":
        losses, chosen_rewards, rejected_rewards = simpo_loss(policy_chosen_avg, policy_rejected_avg, cfg.beta,
                                                              cfg.simpo_gamma, cfg.label_smoothing)
    else:  # orpo: its SFT term is the chosen response's token-average NLL
        losses, chosen_rewards, rejected_rewards = orpo_loss(policy_chosen_avg, policy_rejected_avg,
                                                             -policy_chosen_avg, cfg.orpo_lambda)
    # RPO (Pang et al. 2024, eq. 3): DPO may push log π(y_w) down along with log π(y_l); α·NLL(y_w) keeps y_w likely
    return losses - cfg.rpo_alpha * policy_chosen_avg, chosen_rewards, rejected_rewards


def kto_losses(model, ref_model, batch, cfg):
    """KTO on B unpaired rows -> (losses, rewards of the desirable rows, of the undesirable rows); z0 comes from the
    mismatched pairs (prompt i, completion i+1), without gradient."""
    def logps(m, b):  # log π(y|x) (B,), summed over each row's response
        return sequence_logprobs(m, b["input_ids"], b["attention_mask"], b["response_mask"], compiled=cfg.compile)
    mismatched, labels = {k[3:]: v for k, v in batch.items() if k.startswith("kl_")}, batch["labels"]
    policy_logps = logps(model, batch)
    with torch.no_grad():
        kl_policy_logps = logps(model, mismatched)
        with disable_adapter(ref_model):
            reference_logps, kl_reference_logps = logps(ref_model, batch), logps(ref_model, mismatched)
    losses, rewards, _ = kto_loss(policy_logps, reference_logps, labels, kl_policy_logps, kl_reference_logps, cfg.beta)
    return losses, rewards[labels], rewards[~labels]


def sums_of(losses, chosen_rewards, rejected_rewards, kto: bool = False) -> dict:
    """What a log line averages, summed. Right: a pair whose chosen reward beats the rejected one (kto: a row whose
    reward has its label's sign)."""
    right = (chosen_rewards > 0).sum() + (rejected_rewards < 0).sum() if kto else (chosen_rewards > rejected_rewards)
    return dict(pairs=len(losses), right=float(right.sum()), loss=float(losses.detach().sum()),
                chosen=len(chosen_rewards), rejected=len(rejected_rewards), chosen_rewards=float(chosen_rewards.sum()),
                rejected_rewards=float(rejected_rewards.sum()))


def summarize(totals: Counter, device, prefix: str = "") -> dict:
    """Sums over micro-batches and ranks -> means: loss, reward accuracy, chosen and rejected rewards, margin."""
    keys = ("pairs", "right", "loss", "chosen", "rejected", "chosen_rewards", "rejected_rewards")  # every rank's
    t = loop.all_reduce_dict({k: totals[k] for k in keys}, device)
    chosen, rejected = t["chosen_rewards"] / max(t["chosen"], 1), t["rejected_rewards"] / max(t["rejected"], 1)
    out = {"loss": t["loss"] / max(t["pairs"], 1), "accuracy": t["right"] / max(t["pairs"], 1),
           "chosen_rewards": chosen, "rejected_rewards": rejected, "margin": chosen - rejected}
    return {prefix + k: v for k, v in out.items()}


def main(cfg: Config) -> dict:
    # 0. flags (nonsense is a one-line error, exit 2, before anything is loaded), then this process's device and rank
    check_ranges(cfg, positive=("beta",), non_negative=("orpo_lambda", "rpo_alpha"))
    check(0 <= cfg.label_smoothing < 0.5, f"--label-smoothing must be in [0, 0.5), got {cfg.label_smoothing}")
    check(not cfg.label_smoothing or cfg.loss in ("sigmoid", "cdpo", "robust", "simpo"),
          f"--label-smoothing does not apply to --loss {cfg.loss}")
    kto = cfg.loss == "kto"
    check(not kto or cfg.batch_size > 1 and not cfg.precompute_ref, "--loss kto needs --batch-size > 1 (z0 uses "
          "mismatched pairs) and no --precompute-ref")
    device, rank, world = loop.setup(cfg)

    # 1. data: validated rows (bad input -> `FILE:LINE: what`); --out is checked now, written at step 4
    rows = read_kto(cfg.data) if kto else read_prefs(cfg.data)
    eval_rows = read_prefs(cfg.eval_data, "--eval-data") if cfg.eval_data else []
    loop.prepare_out(cfg.out, cfg, cfg.resume, rank=-1)

    # 2. the policy (full fine-tune, LoRA, or QLoRA) and π_ref: with LoRA the policy itself, its adapter disabled;
    #    a frozen copy for a full fine-tune (unless --precompute-ref, which reads π_ref before the first step only)
    model, tok = loop.prepare_model(cfg, device)  # --compile: fused RMSNorm/RoPE/SwiGLU kernels
    frozen_copy = cfg.lora_rank == 0 and not cfg.precompute_ref and cfg.loss not in REFERENCE_FREE
    ref_model = copy.deepcopy(model).requires_grad_(False).eval() if frozen_copy else model
    params = [p for p in model.parameters() if p.requires_grad]  # LoRA: the adapters only
    opt = loop.make_optimizer(params, cfg.lr, cfg.weight_decay)

    # 3. tokenize; pairs collate to B prompt-shared rows (or 2B rows), kto rows to (B, T) + the mismatched batch
    examples = tokenize_prefs(tok, rows, cfg.max_len, cfg.data, rank == 0)
    eval_examples = tokenize_prefs(tok, eval_rows, cfg.max_len, cfg.eval_data, rank == 0) if eval_rows else []

    def collate(exs):  # kto's unpaired rows, or pairs
        fn = collate_unpaired if "completion" in exs[0] else collate_shared if cfg.share_prompt else collate_pairs
        return {k: v.to(device) for k, v in fn(exs, tok.pad_id, cfg.max_len).items()}

    if cfg.precompute_ref and cfg.loss not in REFERENCE_FREE:  # the policy IS π_ref until the first step
        everything = examples + eval_examples
        with torch.no_grad(), disable_adapter(ref_model), loop.autocast(cfg.bf16, device):
            for exs in (everything[k:k + cfg.batch_size] for k in range(0, len(everything), cfg.batch_size)):
                for e, c, r in zip(exs, *pair_logprobs(ref_model, collate(exs), cfg.compile)):
                    e["ref_logps"] = (float(c), float(r))

    # 4. record the run in --out, or resume it: trainable weights, optimizer, RNGs, step (the data position follows)
    start, extra, logger = loop.start_or_resume(cfg, model, opt, rank,
                                                show=("loss", "accuracy", "margin", "eval_accuracy", "tokens_per_s"))
    skipped = extra.get("skipped", 0)
    global_batch = cfg.batch_size * cfg.grad_accum * world  # pairs (kto: rows) per step, over all ranks
    eval_cfg = replace(cfg, loss="sigmoid") if kto else cfg  # held-out pairs: a kto run is scored as DPO
    totals, seen, t_log, loss, first_loss, train_metrics, eval_metrics = Counter(), 0, time.time(), None, None, {}, {}
    for step in range(start, cfg.max_steps):
        # 5. this rank's share of the global batch, as micro-batches
        idx = loop.shard(loop.batch_indices(step, global_batch, len(examples), cfg.seed), rank, world)
        micro = [[examples[i] for i in idx[k:k + cfg.batch_size]] for k in range(0, len(idx), cfg.batch_size)]

        # 6. per micro-batch: log π(y|x) of chosen and rejected under the policy and π_ref, the loss, its backward.
        #    Summed per-pair losses / the GLOBAL pair count, so micro-batches and ranks add up to one big batch
        loss_sum = torch.zeros((), device=device)
        for exs in micro:
            batch = collate(exs)
            with loop.autocast(cfg.bf16, device):
                losses, chosen_rewards, rejected_rewards = (kto_losses(model, ref_model, batch, cfg) if kto else
                                                            pair_losses(model, ref_model, batch, exs, cfg))
            (losses.sum() / global_batch).backward()
            loss_sum += losses.detach().sum() / global_batch
            totals.update(sums_of(losses, chosen_rewards, rejected_rewards, kto))
            seen += float(batch["branch_ids"].ge(0).sum() if "branch_ids" in batch else batch["attention_mask"].sum())
        loss_t = loop.all_reduce_sum(loss_sum)

        # 7. the step: gradients summed over ranks, clipped; a non-finite loss stops the run (or --skip-nonfinite)
        lr = loop.lr_at(step, cfg.max_steps, cfg.lr, cfg.warmup)
        grad_norm = loop.step_or_skip(opt, params, loss_t, lr, step + 1, cfg)  # nan: skipped
        if math.isfinite(grad_norm):
            loss, first_loss = float(loss_t), float(loss_t) if first_loss is None else first_loss
        skipped += not math.isfinite(grad_norm)

        # 8. eval (every --eval-every steps and at the end), log the means since the last line, save
        last, metrics = step + 1 == cfg.max_steps, {}
        if eval_examples and (last or (cfg.eval_every and (step + 1) % cfg.eval_every == 0)):
            model.eval()  # each rank scores its share of the held-out pairs
            mine, eval_totals = loop.shard(eval_examples, rank, world), Counter()
            with torch.no_grad(), loop.autocast(cfg.bf16, device):
                for exs in (mine[k:k + cfg.batch_size] for k in range(0, len(mine), cfg.batch_size)):
                    eval_totals.update(sums_of(*pair_losses(model, ref_model, collate(exs), exs, eval_cfg)))
            model.train()
            metrics = eval_metrics = summarize(eval_totals, device, "eval_")
        if (step + 1) % cfg.log_every == 0 or step == start or last or metrics:
            train_metrics, now = summarize(totals, device), time.time()
            logger.log(step + 1, **train_metrics, lr=lr, grad_norm=grad_norm, skipped=skipped,
                       tokens_per_s=seen * world / (now - t_log), **metrics)
            totals, seen, t_log = Counter(), 0.0, now
        loop.save_state(cfg, model, opt, step + 1, {"skipped": skipped}, rank)

    # 9. the merged checkpoint (+ adapter/ with LoRA) and metrics.json
    result = {**train_metrics, **eval_metrics, "loss": loss, "first_loss": first_loss, "steps": cfg.max_steps,
              "skipped_steps": skipped, "train_examples": len(examples)}
    loop.finish(cfg.out, model, tok, result, rank, lora=cfg.lora_rank > 0)
    return result


if __name__ == "__main__":
    loop.main_guard(main, Config)
