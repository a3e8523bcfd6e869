"""Direct Preference Optimization and its family: preference tuning without a reward model or sampling.

Rafailov et al. 2023 show the policy is its own reward model, r(x, y) = β·log π(y|x)/π_ref(y|x), so (eq. 7)

    L_DPO = −log σ(β·[(log π(y_w|x) − log π_ref(y_w|x)) − (log π(y_l|x) − log π_ref(y_l|x))])

where log π(y|x) is the SUM of the response's token log-probs, y_w the chosen and y_l the rejected response.
--loss picks a relative (the formulas live in nanoalign/losses.py, with their equation numbers):
    sigmoid  DPO; with --label-smoothing ε it is conservative DPO (cdpo is the same, by name)
    robust   robust DPO (Chowdhury et al. 2024): unbiased when a fraction ε of the labels is flipped
    ipo      IPO (Azar et al. 2023): (h − 1/(2β))² on length-normalised log-ratios, as TRL does
    simpo    SimPO (Meng et al. 2024): no reference; average log-probs, β ≈ 2-2.5 and a margin --simpo-gamma
    orpo     ORPO (Hong et al. 2024): no reference; NLL(y_w) − λ·log σ(log-odds ratio), λ = --orpo-lambda
    kto      KTO (Ethayarajh et al. 2024): unpaired thumbs-up/down rows against a reference point z0, estimated
             from mismatched pairs (prompt i with completion i+1 of the batch; needs --batch-size > 1)
--rpo-alpha α adds α·NLL(y_w) to the paired losses (RPO, Pang et al. 2024; the Llama 3 recipe): pure DPO may push
the chosen response's likelihood down with the rejected one's, and with it the EOS that ends it.

Each pair runs as ONE row [prompt | chosen | rejected] (prefix sharing, prefs.collate_shared): both responses
continue from the prompt's positions and see the prompt and themselves only, so the prompt's forward and backward
run once instead of twice and the log-probs equal those of two separate rows (--share-prompt false: the B chosen
and B rejected rows as one (2B, T) batch). Either way one forward pass scores both halves with the same masks.
Log-probs come from the final hidden states through nanoalign.logprobs (chunked, fp32, and only response
positions reach the lm_head). The reference is the SAME model with its LoRA adapter disabled (`with
disable_adapter(model)`, no grad), which is exactly the SFT model, because each stage saves a merged checkpoint.
With --lora-rank 0 the reference is a frozen copy, or --precompute-ref computes the reference log-probs of the
whole dataset once before training, and then no reference model is kept at all.

Run:
    python -m nanoalign.tasks make --out data --seed 0
    python train_dpo.py --init out/sft --data data/prefs.jsonl --eval-data data/eval_prefs.jsonl --out out/dpo
    python train_dpo.py ... --loss ipo --beta 0.5                     # or sigmoid cdpo robust simpo orpo kto
    python train_dpo.py ... --lora-rank 0 --lr 5e-7 --precompute-ref  # full fine-tune, no reference copy
    torchrun --nproc_per_node=2 train_dpo.py ...                        # data parallel

Simplifications: the data order and gradient all-reduce are as in train_sft.py (position = f(step), hand-rolled
data parallel); KTO's z0 is estimated per micro-batch on each rank (TRL gathers it over ranks) and
--precompute-ref does not apply to it (its mismatched pairs depend on the batch); no reference-model syncing
(TR-DPO), no per-pair margins, no length-desensitised variants.
"""
import copy
import math
import os
import time
from dataclasses import dataclass

import torch

from nanoalign import loop
from nanoalign.cli import Logger, check
from nanoalign.data import read_jsonl, read_prefs, read_unpaired
from nanoalign.packing import branch_logprobs, collate_shared
from nanoalign.prefs import (collate_pairs, collate_unpaired, pairs_to_unpaired, tokenize_prefs,
                             tokenize_unpaired)
from nanoalign.logprobs import token_logprobs
from nanoalign.lora import disable_adapter
from nanoalign.losses import kto_loss, orpo_loss, preference_loss
from nanoalign.model import compile_pointwise

LOSSES = ("sigmoid", "cdpo", "robust", "ipo", "simpo", "orpo", "kto")


@dataclass
class Config:
    """DPO-family preference tuning: the policy against its own adapter-disabled self as the reference."""
    init: str = "smollm2-135m-instruct"  # the SFT model: the policy starts from it and it is the reference
    data: str = ""  # preference JSONL (prompt/chosen/rejected, conversational, HH-style); kto also takes "label" rows
    out: str = ""  # output dir: checkpoint, adapter/, log.jsonl, metrics.json, train_state.pt
    eval_data: str = ""  # held-out preference JSONL: reward accuracy and margin on pairs the policy never saw
    loss: str = "sigmoid"  # sigmoid (DPO), cdpo, robust, ipo, simpo, orpo, kto
    beta: float = 0.1  # β: KL strength of DPO/IPO/KTO (TRL, OpenRLHF, torchtune); SimPO's reward scale (use 2-2.5)
    label_smoothing: float = 0.0  # ε: assumed fraction of flipped labels (cdpo, robust; also sigmoid and simpo)
    simpo_gamma: float = 0.5  # γ: SimPO's target reward margin
    orpo_lambda: float = 0.1  # λ: weight of ORPO's odds-ratio term next to the chosen NLL
    rpo_alpha: float = 0.0  # α: + α·NLL(y_w), the chosen response's token-average NLL (RPO; TRL's rpo_alpha)
    precompute_ref: bool = False  # reference log-probs computed once before training; no reference model kept
    share_prompt: bool = True  # a pair is ONE row [prompt | chosen | rejected]: the prompt runs once for both
    max_steps: int = 200  # optimizer steps
    batch_size: int = 4  # pairs (kto: rows) per micro-batch on each rank
    grad_accum: int = 1  # micro-batches per step; global batch = batch_size * grad_accum * ranks
    # 5e-5: LoRA-DPO sits between Zephyr's QLoRA 5e-6 (7B, 3 epochs) and torchtune's LoRA-DPO 5e-4; with r 16,
    # alpha 32 on a 135M model it moves the implicit rewards within ~100 steps without running away from the
    # reference. A full fine-tune (--lora-rank 0) wants ~5e-7 (Zephyr).
    lr: float = 5e-5  # peak learning rate (see above)
    warmup: int = 10  # linear warmup steps, then cosine decay to 10% of --lr
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    grad_clip: float = 1.0  # clip the global gradient norm to this (0 = off)
    max_len: int = 512  # max tokens per prompt + response (the response's tail is cut; the prompt must fit)
    seed: int = 0  # seeds the data order, LoRA init and dropout
    lora_rank: int = 16  # 0 = full fine-tune; > 0 = LoRA on every linear layer of the blocks (r 16, alpha 32: TRL)
    lora_alpha: float = 32.0  # LoRA scale alpha / rank
    lora_dropout: float = 0.0  # 0: dropout would make π differ from π_ref at step 0 (TRL disables it for DPO)
    nf4: bool = False  # QLoRA: freeze the base in 4-bit NF4 (needs --lora-rank); the reference is that NF4 base
    bf16: bool = False  # bf16 autocast for the model (log-probs and loss stay fp32)
    device: str = "auto"  # cpu, cuda, or auto
    compile: bool = False  # torch.compile RMSNorm, RoPE, SwiGLU and the log-prob kernels: less memory, ~20 s warmup
    resume: bool = False  # continue the run in --out from its train_state.pt
    log_every: int = 10  # progress line + log.jsonl row every N steps
    save_every: int = 0  # write train_state.pt every N steps, for --resume (0 = never)
    eval_every: int = 0  # evaluate on --eval-data every N steps (0 = only at the end)
    skip_nonfinite: bool = False  # skip (and count) steps with a non-finite loss instead of stopping


def sequence_logps(model, batch, cfg, device):
    """Summed response log-probs (N,) fp32 and response lengths (N,) of a collated batch (pad by position).
    A shared-prompt batch (B rows, one pair each) gives the same (2B,) layout: chosen, then rejected."""
    b = {k: v.to(device) for k, v in batch.items() if torch.is_tensor(v)}
    ids, att, resp = b["input_ids"], b["attention_mask"], b["response_mask"]
    with torch.autocast(torch.device(device).type, torch.bfloat16, enabled=cfg.bf16):
        if "prev_index" not in b:
            lp = token_logprobs(model, ids, att, resp, compiled=cfg.compile)  # (N, T-1), 0 off the response
            return lp.sum(-1), resp[:, 1:].sum(-1).clamp(min=1).float()  # target t+1 is scored at position t
        lp = branch_logprobs(model, ids, att, b["position_ids"], b["prev_index"], resp,
                             compiled=cfg.compile)  # (B, T), aligned with ids
    per = [(b["branch_ids"] == k).float() for k in (1, 2)]  # chosen, rejected
    return (torch.cat([(lp * m).sum(-1) for m in per]),
            torch.cat([(resp * m).sum(-1) for m in per]).clamp(min=1))


@torch.no_grad()
def reference_logps(model, ref_model, batch, cfg, device):
    """log π_ref (N,): the frozen copy if there is one, else the policy with its adapters disabled."""
    if ref_model is not None:
        return sequence_logps(ref_model, batch, cfg, device)[0]
    with disable_adapter(model):
        return sequence_logps(model, batch, cfg, device)[0]


def pair_losses(loss, cfg, logps, lengths, ref_logps):
    """(2B,) chosen-then-rejected log-probs -> (losses, chosen_rewards, rejected_rewards), each (B,)."""
    pc, pr = logps.chunk(2)  # policy_chosen_logps, policy_rejected_logps
    nc, nr = lengths.chunk(2)  # response token counts
    if loss == "orpo":  # the SFT term is the chosen response's token-average NLL (Hong et al. 2024, eq. 2)
        return orpo_loss(pc / nc, pr / nr, -pc / nc, cfg.orpo_lambda)
    rc, rr = ref_logps.chunk(2) if ref_logps is not None else (None, None)  # reference_{chosen,rejected}_logps
    losses, chosen, rejected = preference_loss(pc, pr, rc, rr, cfg.beta, loss, cfg.label_smoothing, cfg.simpo_gamma,
                                               nc, nr)
    # RPO (Pang et al. 2024, eq. 3): DPO can lower log π(y_w) too, as long as log π(y_l) falls faster; the NLL of
    # the chosen response keeps it likely (and its EOS: pure DPO on off-policy pairs drifts to longer responses)
    return losses + cfg.rpo_alpha * (-pc / nc), chosen, rejected


def reference_for(exs, batch, model, ref_model, cfg, device):
    """π_ref log-probs of a pairs batch (2B,): precomputed, or computed now; None for reference-free losses."""
    if cfg.loss in ("simpo", "orpo"):
        return None
    if cfg.precompute_ref:
        return torch.tensor([e["ref_chosen"] for e in exs] + [e["ref_rejected"] for e in exs], device=device)
    return reference_logps(model, ref_model, batch, cfg, device)


def stats_of(chosen_rewards, rejected_rewards, correct, n) -> torch.Tensor:
    """[pairs or rows, correct, chosen reward sum, #chosen, rejected reward sum, #rejected]: summable."""
    c, r = chosen_rewards.detach().float(), rejected_rewards.detach().float()
    return torch.tensor([float(n), float(correct), float(c.sum()), len(c), float(r.sum()), len(r)])


def summarize(s, prefix: str = "") -> dict:
    chosen, rejected = float(s[2]) / max(float(s[3]), 1), float(s[4]) / max(float(s[5]), 1)
    return {f"{prefix}accuracy": float(s[1]) / max(float(s[0]), 1), f"{prefix}chosen_rewards": chosen,
            f"{prefix}rejected_rewards": rejected, f"{prefix}margin": chosen - rejected}


@torch.no_grad()
def evaluate(model, ref_model, examples, collate, cfg, device, rank, world) -> dict:
    """Held-out reward accuracy (chosen's implicit reward > rejected's) and margin; KTO is scored as DPO."""
    model.eval()
    loss = "sigmoid" if cfg.loss == "kto" else cfg.loss
    mine = loop.shard(list(range(len(examples))), rank, world)
    stats, loss_sum = torch.zeros(6), 0.0
    for k in range(0, len(mine), cfg.batch_size):
        exs = [examples[i] for i in mine[k:k + cfg.batch_size]]
        batch = collate(exs)
        logps, lengths = sequence_logps(model, batch, cfg, device)
        ref = reference_for(exs, batch, model, ref_model, cfg, device)
        losses, c, r = pair_losses(loss, cfg, logps, lengths, ref)
        stats += stats_of(c, r, (c > r).sum(), len(exs))
        loss_sum += float(losses.sum())
    model.train()
    total = loop.all_reduce_sum(torch.cat([stats, torch.tensor([loss_sum])]).to(device)).cpu()
    return {**summarize(total, "eval_"), "eval_loss": float(total[6] / max(float(total[0]), 1))}


@torch.no_grad()
def precompute_reference(model, examples, collate, cfg, device):
    """Store each pair's reference log-probs before training moves the policy (the policy IS π_ref now)."""
    for k in range(0, len(examples), cfg.batch_size):
        exs = examples[k:k + cfg.batch_size]
        ref = reference_logps(model, None, collate(exs), cfg, device).cpu()  # (2B,)
        for e, c, r in zip(exs, *ref.chunk(2)):
            e["ref_chosen"], e["ref_rejected"] = float(c), float(r)  # fp32 -> float is exact


def read_training_rows(cfg):
    """Pairs for the pairwise losses; for kto, unpaired rows (a file with "label") or pairs split into them."""
    if cfg.loss != "kto":
        return read_prefs(cfg.data)
    first = read_jsonl(cfg.data)[0][1]
    return read_unpaired(cfg.data) if "label" in first else pairs_to_unpaired(read_prefs(cfg.data))


def main(cfg: Config) -> dict:
    # 0. flags: nonsense values are one-line errors (exit 2) before anything is loaded
    for name in ("max_steps", "batch_size", "grad_accum", "max_len", "log_every", "lr", "beta"):
        check(getattr(cfg, name) > 0, f"--{name.replace('_', '-')} must be > 0, got {getattr(cfg, name)}")
    for name in ("warmup", "save_every", "eval_every", "weight_decay", "grad_clip", "lora_rank", "orpo_lambda",
                 "rpo_alpha"):
        check(getattr(cfg, name) >= 0, f"--{name.replace('_', '-')} must be >= 0, got {getattr(cfg, name)}")
    check(cfg.loss in LOSSES, f"--loss must be one of {', '.join(LOSSES)}, got {cfg.loss!r}")
    check(0 <= cfg.label_smoothing < 0.5, f"--label-smoothing must be in [0, 0.5), got {cfg.label_smoothing}")
    check(0 <= cfg.lora_dropout < 1, f"--lora-dropout must be in [0, 1), got {cfg.lora_dropout}")
    check(cfg.loss != "kto" or cfg.batch_size > 1, "--loss kto needs --batch-size > 1 (z0 uses mismatched pairs)")
    check(cfg.loss != "kto" or not cfg.precompute_ref, "--precompute-ref does not apply to --loss kto (its "
          "mismatched pairs depend on the batch)")
    device, rank, world = loop.setup(cfg.seed, cfg.device)
    kto = cfg.loss == "kto"

    # 1. data: validated rows (bad input -> `FILE:LINE: what`); --out is checked now but written only when every
    #    input has passed (step 4; rank -1: check only), so a bad run leaves nothing behind
    rows = read_training_rows(cfg)
    eval_rows = read_prefs(cfg.eval_data) if cfg.eval_data else []
    loop.prepare_out(cfg.out, cfg, cfg.resume, rank=-1)

    # 2. model: full fine-tune, LoRA, or QLoRA. The reference: the adapter-disabled policy with LoRA; a frozen copy
    #    for a full fine-tune, unless --precompute-ref; none at all for the reference-free simpo and orpo.
    model, tok = loop.prepare_model(cfg.init, device, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.nf4)
    check(cfg.max_len <= model.cfg.max_position_embeddings,
          f"--max-len {cfg.max_len} exceeds the model's {model.cfg.max_position_embeddings} positions")
    ref_model = None
    if cfg.lora_rank == 0 and not cfg.precompute_ref and cfg.loss not in ("simpo", "orpo"):
        ref_model = copy.deepcopy(model).requires_grad_(False).eval()
    model.train()
    if cfg.compile:  # fused RMSNorm/RoPE/SwiGLU (the matmuls and attention stay eager)
        compile_pointwise()
    params = loop.trainable(model)
    opt = loop.make_optimizer(params, cfg.lr, cfg.weight_decay)

    # 3. tokenize: prompt ids + response ids (ending with <|im_end|>); a pair collates into one shared-prompt row
    #    (or chosen-then-rejected into a (2B, T) batch), kto rows into (B, T) plus the mismatched (B, T) batch for z0
    tokenize = tokenize_unpaired if kto else tokenize_prefs
    examples = tokenize(tok, rows, cfg.max_len, cfg.data, rank == 0)
    eval_examples = tokenize_prefs(tok, eval_rows, cfg.max_len, cfg.eval_data, rank == 0) if eval_rows else []

    def collate(exs):
        return (collate_shared if cfg.share_prompt else collate_pairs)(exs, tok.pad_id, cfg.max_len)

    def collate_kto(exs):
        return collate_unpaired(exs, tok.pad_id, cfg.max_len, mismatched=True)

    if cfg.precompute_ref and cfg.loss not in ("simpo", "orpo"):
        t0 = time.time()
        precompute_reference(model, examples + eval_examples, collate, cfg, device)
        if rank == 0:
            print(f"reference log-probs of {len(examples) + len(eval_examples)} pairs in {time.time() - t0:.1f}s")

    # 4. record the run in --out (rank 0, after every rank has checked it), or resume it: trainable weights,
    #    optimizer, RNGs and the step; the data position follows from the step
    st = loop.start_or_resume(cfg, model, opt, rank)
    start, skipped = st["step"], st["extra"].get("skipped", 0)

    logger = Logger(cfg.out, cfg.max_steps, enabled=rank == 0, start_step=start)
    global_batch = cfg.batch_size * cfg.grad_accum * world
    inject = int(os.environ.get("NANOALIGN_INJECT_NAN_STEP", 0))  # fault injection for the tests (1-based step)
    stats, seen, t_log = torch.zeros(6), 0.0, time.time()
    loss = first_loss = None
    train_metrics, eval_metrics = {}, {}
    for step in range(start, cfg.max_steps):
        # 5. this rank's share of the global batch, as micro-batches
        idx = loop.shard(loop.batch_indices(step, global_batch, len(examples), cfg.seed), rank, world)
        micro = [[examples[i] for i in idx[k:k + cfg.batch_size]] for k in range(0, len(idx), cfg.batch_size)]
        n_global = loop.all_reduce_sum(torch.tensor(float(len(idx)), device=device))  # pairs (kto: rows), all ranks

        # 6. forward + backward per micro-batch: summed per-pair losses / the GLOBAL count, so they add up exactly
        loss_sum = torch.zeros((), device=device)
        for exs in micro:
            if kto:
                batch = collate_kto(exs)
                kl_batch = {k[3:]: v for k, v in batch.items() if k.startswith("kl_")}
                logps, _ = sequence_logps(model, batch, cfg, device)  # (B,)
                ref = reference_logps(model, ref_model, batch, cfg, device)
                with torch.no_grad():  # z0 is detached: the mismatched pairs need no graph
                    kl_policy = sequence_logps(model, kl_batch, cfg, device)[0]
                kl_ref = reference_logps(model, ref_model, kl_batch, cfg, device)
                labels = batch["labels"].to(device)
                losses, rewards, _ = kto_loss(logps, ref, labels, kl_policy, kl_ref, cfg.beta)
                c, r = rewards[labels], rewards[~labels]  # desirable / undesirable rows
                stats += stats_of(c, r, ((rewards > 0) == labels).sum(), len(exs))  # right sign of reward
            else:
                batch = collate(exs)  # B shared-prompt rows (or 2B rows: chosen, then rejected)
                logps, lengths = sequence_logps(model, batch, cfg, device)  # (2B,)
                ref = reference_for(exs, batch, model, ref_model, cfg, device)
                losses, c, r = pair_losses(cfg.loss, cfg, logps, lengths, ref)
                stats += stats_of(c, r, (c > r).sum(), len(exs))
            mloss = losses.sum() / n_global
            if step + 1 == inject:
                mloss = mloss * float("nan")
            mloss.backward()
            loss_sum += mloss.detach()
            seen += float(batch["attention_mask"].sum())
        loss_t = loop.all_reduce_sum(loss_sum)

        # 7. a non-finite loss stops the run (the last train_state.pt stays intact) or, with --skip-nonfinite, is
        #    skipped; otherwise sum the gradients over ranks, clip, and step at the scheduled lr
        lr = loop.lr_at(step, cfg.max_steps, cfg.lr, cfg.warmup)
        grad_norm = loop.step_or_skip(opt, params, loss_t, lr, step + 1, cfg)  # nan: skipped
        if math.isfinite(grad_norm):
            loss = float(loss_t)
            first_loss = loss if first_loss is None else first_loss
        else:
            skipped += 1

        # 8. eval (every --eval-every steps and at the end), log (rewards, accuracy and margin over the steps since
        #    the last line), save
        metrics = {}
        last = step + 1 == cfg.max_steps
        if eval_examples and (last or (cfg.eval_every and (step + 1) % cfg.eval_every == 0)):
            metrics = eval_metrics = evaluate(model, ref_model, eval_examples, collate, cfg, device, rank, world)
        if (step + 1) % cfg.log_every == 0 or step == start or last or metrics:
            now = time.time()
            train_metrics = summarize(loop.all_reduce_sum(stats.to(device)).cpu())
            logger.log(step + 1, loss=float(loss_t), **train_metrics, lr=lr, grad_norm=grad_norm,
                       tokens_per_s=seen * world / (now - t_log), skipped=skipped, **metrics)
            stats, seen, t_log = torch.zeros(6), 0.0, now
        if cfg.save_every and (step + 1) % cfg.save_every == 0:
            loop.save_state(cfg.out, model, opt, step + 1, {"skipped": skipped}, rank)

    # 9. the merged checkpoint (+ adapter/ with LoRA) and metrics.json
    result = {"loss": loss, "first_loss": first_loss, **train_metrics, **eval_metrics, "steps": cfg.max_steps,
              "skipped_steps": skipped, "train_examples": len(examples)}
    loop.finish(cfg.out, model, tok, result, rank, lora=cfg.lora_rank > 0)
    return result


if __name__ == "__main__":
    loop.main_guard(main, Config)
