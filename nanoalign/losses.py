"""Alignment losses as pure functions: tensors and floats in, tensors out, each with its paper's equation.

Per-token tensors are (B, T) with a 0/1 mask; masked positions never contribute (torch.where, so even a NaN or -inf
at a padded position cannot leak into a sum). The RLHF side (KL, GAE, PPO, RLOO, GRPO) is nanoalign/rl.py.
"""
import math

import torch
import torch.nn.functional as F


# ---------------------------------------------------------------- masked reductions
def masked_sum(x, mask):  # Σ x over mask == 1
    return torch.where(mask.bool(), x, torch.zeros_like(x)).sum()


def masked_mean(x, mask, dist_sum=None):
    """Mean of x over mask == 1 (0, not NaN, when nothing is unmasked). dist_sum: a function that sums a tensor over
    ranks (loop.all_reduce_sum), for the mean over EVERY rank's entries; None = this process's entries."""
    s, n = masked_sum(x, mask), mask.sum()
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


def whiten(x, mask, shift_mean: bool = True, eps: float = 1e-8, dist_sum=None):
    """(x − mean) / std over the masked entries; shift_mean=False adds the mean back (used for rewards).
    dist_sum (loop.all_reduce_sum): the moments of every rank's entries, so W ranks whiten like one process."""
    mean, var = masked_mean(x, mask, dist_sum=dist_sum), masked_var(x, mask, dist_sum=dist_sum)
    out = (x - mean) * torch.rsqrt(var + eps) + (0.0 if shift_mean else mean)
    return torch.where(mask.bool(), out, torch.zeros_like(out))


# ---------------------------------------------------------------- SFT and reward model
def sft_loss(logps, mask, num_tokens=None):
    """Token-mean NLL −Σ logp·mask / num_tokens, logps and mask (B, T). num_tokens defaults to mask.sum(); with
    gradient accumulation (and DDP) pass the GLOBAL count of target tokens of the whole optimizer step, so that the
    micro-batch losses add up to the big-batch loss (transformers #34191): batch 8 × accum 1 == batch 1 × accum 8."""
    return -masked_sum(logps, mask) / (mask.sum() if num_tokens is None else num_tokens)


def bradley_terry_loss(chosen_rewards, rejected_rewards, margin=0.0, center_coef: float = 0.0):
    """Per-pair reward-model loss (B,): −log σ(r_c − r_r − m) + λ·(r_c + r_r)². margin m: a float or (B,) (Llama 2's
    RM margin); center_coef λ keeps rewards centred at 0 (TRL's center_rewards, ~0.01)."""
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards - margin)  # −log σ(r_c − r_r − m)
    if center_coef:
        losses = losses + center_coef * (chosen_rewards + rejected_rewards) ** 2  # + λ·(r_c + r_r)²
    return losses


# ---------------------------------------------------------------- DPO family
# Each pairwise loss returns (losses, chosen_rewards, rejected_rewards), each (B,), the rewards detached for logging
# (as in Mitchell's preference_loss). policy_chosen_logps is log π(y_w|x) SUMMED over the chosen response's tokens,
# (B,), and likewise the others; IPO, SimPO and ORPO take per-token AVERAGES instead (the caller divides).
def dpo_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
             beta: float, label_smoothing: float = 0.0):
    """DPO (Rafailov et al. 2023, eq. 7): −log σ(β·h), h = Δ_w − Δ_l, Δ = log π(y|x) − log π_ref(y|x).
    label_smoothing ε > 0 is conservative DPO (cDPO, Mitchell 2023): each label is wrong with probability ε."""
    chosen_logratios = policy_chosen_logps - reference_chosen_logps  # Δ_w
    rejected_logratios = policy_rejected_logps - reference_rejected_logps  # Δ_l
    logits = beta * (chosen_logratios - rejected_logratios)  # β·h
    losses = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()  # r = β·Δ


def robust_dpo_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
                    beta: float, label_smoothing: float):
    """Robust DPO (Chowdhury et al. 2024, rDPO): if a fraction ε of the labels is flipped at random, this is an
    unbiased estimate of the clean DPO loss: [(1−ε)·L(y_w, y_l) − ε·L(y_l, y_w)] / (1 − 2ε), L = −log σ(β·h)."""
    chosen_logratios = policy_chosen_logps - reference_chosen_logps
    rejected_logratios = policy_rejected_logps - reference_rejected_logps
    logits, eps = beta * (chosen_logratios - rejected_logratios), label_smoothing
    losses = (-(1 - eps) * F.logsigmoid(logits) + eps * F.logsigmoid(-logits)) / (1 - 2 * eps)
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def ipo_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
             beta: float):
    """IPO (Azar et al. 2023, eq. 17): (h − 1/(2β))², a squared loss that keeps h at a finite target where DPO's
    −log σ pushes it on forever. The log-probs are per-token AVERAGES, as TRL does it (with the IPO authors' word)."""
    chosen_logratios = policy_chosen_logps - reference_chosen_logps
    rejected_logratios = policy_rejected_logps - reference_rejected_logps
    losses = (chosen_logratios - rejected_logratios - 1 / (2 * beta)) ** 2
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def simpo_loss(policy_chosen_logps, policy_rejected_logps, beta: float, gamma: float, label_smoothing: float = 0.0):
    """SimPO (Meng et al. 2024, eq. 6): −log σ(β·(avg log π(y_w|x) − avg log π(y_l|x)) − γ), no reference model:
    the reward is the per-token AVERAGE log-prob (the inputs), scaled by β (≈ 2–2.5), with a target margin γ.
    label_smoothing ε as in cDPO."""
    logits = beta * (policy_chosen_logps - policy_rejected_logps) - gamma
    losses = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    return losses, beta * policy_chosen_logps.detach(), beta * policy_rejected_logps.detach()


def log1mexp(x):
    """log(1 − exp(x)) for x < 0, stable at both ends (Mächler 2012); x is clamped to ≤ −1e-7."""
    x = x.clamp(max=-1e-7)
    # both branches are evaluated by torch.where, so clamp each to its safe range (no inf/NaN in the gradient)
    a = torch.log(-torch.expm1(x.clamp(min=-math.log(2))))
    b = torch.log1p(-torch.exp(x.clamp(max=-math.log(2))))
    return torch.where(x > -math.log(2), a, b)


def orpo_loss(chosen_avg_logps, rejected_avg_logps, chosen_nll, lam: float = 0.1):
    """ORPO (Hong et al. 2024, eq. 6–7), no reference model: NLL(y_w) − λ·log σ(log odds(y_w) − log odds(y_l)),
    odds(y) = p / (1 − p) with p = exp(per-token average log-prob). chosen_nll: the SFT term, (B,) or a scalar."""
    chosen_log_odds = chosen_avg_logps - log1mexp(chosen_avg_logps)  # log p − log(1 − p)
    rejected_log_odds = rejected_avg_logps - log1mexp(rejected_avg_logps)
    losses = chosen_nll - lam * F.logsigmoid(chosen_log_odds - rejected_log_odds)
    return losses, lam * chosen_avg_logps.detach(), lam * rejected_avg_logps.detach()


def kto_loss(policy_logps, reference_logps, labels, kl_policy_logps, kl_reference_logps, beta: float):
    """KTO (Ethayarajh et al. 2024, eq. 8), on unpaired rows. Returns (losses (B,), rewards (B,), z0 scalar).
    policy_logps, reference_logps: SUMMED log-probs of each completion (B,); labels: (B,) bool, True = desirable.
    kl_policy_logps, kl_reference_logps: summed log-probs of MISMATCHED (prompt, completion) pairs (B',), e.g. each
    prompt with another row's completion; their mean log-ratio estimates KL(π‖π_ref) (needs batch > 1)."""
    # z₀ = max(0, mean KL estimate), detached: a reference point, not a path for gradients
    z0 = (kl_policy_logps - kl_reference_logps).mean().clamp(min=0).detach()
    logratios = policy_logps - reference_logps  # Δ = log π(y|x) − log π_ref(y|x)
    desirable = 1 - torch.sigmoid(beta * (logratios - z0))  # 1 − σ(β(Δ − z₀))
    undesirable = 1 - torch.sigmoid(beta * (z0 - logratios))  # 1 − σ(β(z₀ − Δ))
    return torch.where(labels.bool(), desirable, undesirable), beta * logratios.detach(), z0
