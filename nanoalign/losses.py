"""Alignment losses as pure functions: tensors and floats in, tensors out. Equations from REFERENCE.md / the papers.

Conventions
- "logps" of a response are SUMMED token log-probs over its response tokens (B,), as in Rafailov et al. (DPO).
  Losses that need per-token averages (IPO as TRL does it, SimPO, ORPO) take the lengths and divide inside,
  or say "avg" in the argument name.
- Per-token tensors are (B, T) with a 0/1 mask; masked positions never contribute (torch.where, so even a NaN or
  -inf at a padded position cannot leak into a sum).
- Logged rewards are detached, as in Mitchell's DPO `preference_loss`.
The RLHF side (KL estimators and controllers, GAE, PPO, RLOO, GRPO) is nanoalign/rl.py.
"""
import math

import torch
import torch.nn.functional as F


# ---------------------------------------------------------------- masked reductions

def masked_sum(x, mask, dim=None):
    """Σ x over mask == 1 (over all elements, or along `dim`)."""
    x = torch.where(mask.bool(), x, torch.zeros_like(x))
    return x.sum() if dim is None else x.sum(dim)


def masked_mean(x, mask, dim=None, dist_sum=None):
    """Mean of x over mask == 1; an all-masked row gives 0, not NaN.

    dist_sum: a function that sums a tensor over ranks (loop.all_reduce_sum), for the mean over EVERY rank's masked
    entries (dim=None only); None = this process's entries.
    """
    n = mask.sum() if dim is None else mask.sum(dim)
    s = masked_sum(x, mask, dim)
    if dist_sum is not None:  # the sum and the count, each summed over ranks, in one collective
        s, n = dist_sum(torch.stack([s, n.to(s.dtype)]))
    return s / n.clamp(min=1)


def masked_var(x, mask, unbiased: bool = True, dist_sum=None):
    """Variance of x over mask == 1 (Bessel-corrected like lm-human-preferences / TRL `masked_var`); dist_sum as in
    masked_mean: two passes (mean, then squared deviations) over every rank's entries, as one process would."""
    mean = masked_mean(x, mask, dist_sum=dist_sum)
    var = masked_mean((x - mean) ** 2, mask, dist_sum=dist_sum)
    n = mask.sum() if dist_sum is None else dist_sum(mask.sum().to(var.dtype))
    return var * n / (n - 1) if unbiased else var


def whiten(x, mask=None, shift_mean: bool = True, eps: float = 1e-8, dist_sum=None):
    """(x − mean) / std over the masked entries; shift_mean=False adds the mean back (used for rewards).
    dist_sum (loop.all_reduce_sum): the moments of every rank's entries, so W ranks whiten like one process."""
    mask = torch.ones_like(x) if mask is None else mask
    mean, var = masked_mean(x, mask, dist_sum=dist_sum), masked_var(x, mask, dist_sum=dist_sum)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(mask.bool(), out, torch.zeros_like(out))


# ---------------------------------------------------------------- SFT and reward model

def sft_loss(logps, mask, num_tokens=None):
    """Token-mean NLL: −Σ logp·mask / num_tokens. logps, mask: (B, T).

    num_tokens defaults to mask.sum(). With gradient accumulation (and DDP) pass the GLOBAL count of target tokens
    in the whole optimizer step, so the micro-batch losses add up to the big-batch loss (pitfall 7, transformers
    #34191): batch 8 × accum 1 == batch 1 × accum 8.
    """
    if num_tokens is None:
        num_tokens = mask.sum()
    return -masked_sum(logps, mask) / num_tokens


def bradley_terry_loss(chosen_rewards, rejected_rewards, margin=None, center_coef: float = 0.0):
    """Per-pair reward-model loss (B,): −log σ(r_c − r_r − m) + λ·(r_c + r_r)².

    margin: (B,) or None (Llama-2 RM margin); center_coef λ keeps rewards centred at 0 (TRL's center_rewards, ~0.01).
    """
    diff = chosen_rewards - rejected_rewards
    if margin is not None:
        diff = diff - margin
    losses = -F.logsigmoid(diff)  # −log σ(r_c − r_r − m)
    if center_coef:
        losses = losses + center_coef * (chosen_rewards + rejected_rewards) ** 2  # + λ·(r_c + r_r)²
    return losses


# ---------------------------------------------------------------- DPO family

def preference_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
                    beta: float, loss_type: str = "sigmoid", label_smoothing: float = 0.0, gamma: float = 0.5,
                    chosen_lengths=None, rejected_lengths=None, reference_free: bool = False):
    """DPO-family loss per pair. Returns (losses, chosen_rewards, rejected_rewards), each (B,).

    policy_chosen_logps: log π(y_w|x), SUMMED over the chosen response's tokens (B,); likewise the others.
    reference_*_logps: the same under π_ref (ignored by simpo, or with reference_free=True).
    beta: β, the KL strength (simpo: the reward scale, typically 2–2.5).
    loss_type: sigmoid (DPO eq. 7; with label_smoothing ε it is cDPO), cdpo, robust, ipo, simpo.
    label_smoothing: ε, the assumed fraction of flipped labels (cdpo, robust, simpo).
    gamma: SimPO's target margin γ.
    chosen_lengths, rejected_lengths: response token counts (B,). Required by ipo and simpo, which use per-token
        AVERAGE log-probs: TRL length-normalises IPO's log-ratios (confirmed with the IPO authors); SimPO's
        reward is the average log-prob by definition.
    """
    if reference_free or loss_type == "simpo":
        reference_chosen_logps = torch.zeros_like(policy_chosen_logps)
        reference_rejected_logps = torch.zeros_like(policy_rejected_logps)
    chosen_logratios = policy_chosen_logps - reference_chosen_logps  # Δ_w = log π(y_w|x) − log π_ref(y_w|x)
    rejected_logratios = policy_rejected_logps - reference_rejected_logps  # Δ_l
    if loss_type in ("ipo", "simpo"):
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError(f"loss_type={loss_type!r} needs chosen_lengths and rejected_lengths")
        chosen_logratios = chosen_logratios / chosen_lengths  # per-token averages
        rejected_logratios = rejected_logratios / rejected_lengths
    h = chosen_logratios - rejected_logratios  # h = Δ_w − Δ_l
    eps = label_smoothing
    if loss_type in ("sigmoid", "cdpo"):
        # DPO eq. 7: −log σ(β·h); cDPO: −(1−ε)·log σ(βh) − ε·log σ(−βh)
        losses = -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
    elif loss_type == "robust":
        # robust DPO (Chowdhury et al. 2024): [−(1−ε)·log σ(βh) + ε·log σ(−βh)] / (1 − 2ε)
        losses = (-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2  # IPO (Azar et al. 2023, eq. 17): (h − 1/(2β))²
    elif loss_type == "simpo":
        # SimPO (Meng et al. 2024, eq. 6): −log σ(β·(avg log π(y_w) − avg log π(y_l)) − γ), with label smoothing
        logits = beta * h - gamma
        losses = -(1 - eps) * F.logsigmoid(logits) - eps * F.logsigmoid(-logits)
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}")
    chosen_rewards = beta * chosen_logratios.detach()  # implicit reward r = β·Δ (simpo: β·avg log π)
    rejected_rewards = beta * rejected_logratios.detach()
    return losses, chosen_rewards, rejected_rewards


def log1mexp(x):
    """log(1 − exp(x)) for x < 0, stable at both ends (Mächler 2012); x is clamped to ≤ −1e-7."""
    x = x.clamp(max=-1e-7)
    near0 = x > -math.log(2)
    # both branches are evaluated by torch.where, so clamp each to its safe range (no inf/NaN in the gradient)
    a = torch.log(-torch.expm1(x.clamp(min=-math.log(2))))
    b = torch.log1p(-torch.exp(x.clamp(max=-math.log(2))))
    return torch.where(near0, a, b)


def orpo_loss(chosen_avg_logps, rejected_avg_logps, chosen_nll, lam: float = 0.1):
    """ORPO (Hong et al. 2024, eq. 6–7). Returns (losses, chosen_rewards, rejected_rewards), each (B,).

    chosen_avg_logps, rejected_avg_logps: per-token AVERAGE log-probs of the responses (B,), no reference model.
    chosen_nll: the SFT term on the chosen response, (B,) or a scalar (e.g. sft_loss over the batch).
    lam: λ, the weight of the odds-ratio term.
    """
    # log odds(y|x) = log p − log(1 − p), with p = exp(avg log-prob)
    chosen_log_odds = chosen_avg_logps - log1mexp(chosen_avg_logps)
    rejected_log_odds = rejected_avg_logps - log1mexp(rejected_avg_logps)
    ratio = F.logsigmoid(chosen_log_odds - rejected_log_odds)  # log σ(log odds_w − log odds_l)
    losses = chosen_nll - lam * ratio  # L = NLL(y_w) − λ·log σ(·)
    return losses, lam * chosen_avg_logps.detach(), lam * rejected_avg_logps.detach()


def kto_loss(policy_logps, reference_logps, labels, kl_policy_logps, kl_reference_logps, beta: float,
             desirable_weight: float = 1.0, undesirable_weight: float = 1.0):
    """KTO (Ethayarajh et al. 2024, eq. 8). Returns (losses (B,), rewards (B,), z0 scalar).

    policy_logps, reference_logps: SUMMED log-probs of each completion (B,); labels: (B,) bool, True = desirable.
    kl_policy_logps, kl_reference_logps: summed log-probs of MISMATCHED (prompt, completion) pairs (B',), e.g. each
        prompt with another row's completion; their mean log-ratio estimates KL(π‖π_ref) (needs batch > 1).
    """
    # z₀ = max(0, mean KL estimate), detached: a reference point, not a path for gradients
    z0 = (kl_policy_logps - kl_reference_logps).mean().clamp(min=0).detach()
    logratios = policy_logps - reference_logps  # Δ = log π(y|x) − log π_ref(y|x)
    desirable = 1 - torch.sigmoid(beta * (logratios - z0))  # 1 − σ(β(Δ − z₀))
    undesirable = 1 - torch.sigmoid(beta * (z0 - logratios))  # 1 − σ(β(z₀ − Δ))
    losses = torch.where(labels.bool(), desirable_weight * desirable, undesirable_weight * undesirable)
    return losses, beta * logratios.detach(), z0
