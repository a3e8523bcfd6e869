"""Alignment losses as pure functions: tensors and floats in, tensors out. Equations from REFERENCE.md / the papers.

Conventions
- "logps" of a response are SUMMED token log-probs over its response tokens (B,), as in Rafailov et al. (DPO).
  Losses that need per-token averages (IPO as TRL does it, SimPO, ORPO) take the lengths and divide inside,
  or say "avg" in the argument name.
- Per-token tensors are (B, T) with a 0/1 mask; masked positions never contribute (torch.where, so even a NaN or
  -inf at a padded position cannot leak into a sum).
- Logged rewards are detached, as in Mitchell's DPO `preference_loss`.
"""
import math

import torch
import torch.nn.functional as F

from nanoalign.model import last_token_index


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


# ---------------------------------------------------------------- RLHF: KL, rewards, advantages

def kl_penalty(logprobs, ref_logprobs, estimator: str = "k1"):
    """Per-token KL(π‖π_ref) estimate at the sampled token (Schulman 2020), with log r = log π_ref − log π.

    k1 = −log r (unbiased, can be < 0 per token); k2 = ½(log r)²; k3 = (r − 1) − log r (unbiased, ≥ 0 pointwise).
    """
    log_r = ref_logprobs - logprobs
    if estimator == "k1":
        return -log_r
    if estimator == "k2":
        return 0.5 * log_r ** 2
    if estimator == "k3":
        return torch.expm1(log_r) - log_r  # (r − 1) − log r
    raise ValueError(f"unknown KL estimator {estimator!r}")


class AdaptiveKLController:
    """Ziegler et al. 2019, §2.2: steer the KL coefficient β toward a target KL.

    e = clip(KL/KL_target − 1, −0.2, 0.2);  β ← β·(1 + e·n/horizon), n = samples in the batch.
    OpenAI's values: β₀ = 0.15, target 6, horizon 10,000.
    """

    def __init__(self, init_kl_coef: float = 0.15, target: float = 6.0, horizon: float = 10000.0):
        self.value, self.target, self.horizon = float(init_kl_coef), float(target), float(horizon)

    def update(self, current_kl: float, n_samples: int) -> float:
        error = min(max(float(current_kl) / self.target - 1, -0.2), 0.2)  # e = clip(KL/target − 1, ±0.2)
        self.value *= 1 + error * n_samples / self.horizon  # β ← β(1 + e·n/horizon)
        return self.value

    def state_dict(self) -> dict:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict):
        self.value, self.target, self.horizon = float(state["value"]), float(state["target"]), float(state["horizon"])


class FixedKLController:
    """A constant β with the adaptive controller's interface."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_samples: int) -> float:
        return self.value

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict):
        self.value = float(state["value"])


def per_token_rewards(scores, logprobs, ref_logprobs, response_mask, kl_coef: float, estimator: str = "k1"):
    """RLHF rewards (Ziegler et al. 2019): r_t = −β·KL_t, plus the score at the last real response token (pitfall 6).

    scores: (B,) reward-model or gold scores; logprobs, ref_logprobs, response_mask: (B, T).
    Returns (rewards (B, T), kl (B, T)), both 0 at padded positions.
    """
    zero = torch.zeros_like(logprobs)
    kl = torch.where(response_mask.bool(), kl_penalty(logprobs, ref_logprobs, estimator), zero)  # (B, T)
    rewards = -kl_coef * kl  # r_t = −β·KL_t
    last = last_token_index(response_mask)  # (B,)
    rewards = rewards.scatter_add(1, last[:, None], scores[:, None].to(rewards.dtype))  # + score at the last token
    return rewards, kl


def gae(rewards, values, response_mask, gamma: float, lam: float):
    """Generalised advantage estimation (Schulman et al. 2016, eq. 16). Returns (advantages, returns), (B, T).

    δ_t = r_t + γ·V_{t+1} − V_t;  Â_t = δ_t + γλ·Â_{t+1};  R_t = Â_t + V_t;  V past the last real token = 0.
    Masked positions are skipped: "t+1" is the next REAL token, so right padding (and any hole) contributes
    nothing, and advantages/returns are 0 there.
    """
    mask = response_mask.bool()
    B, T = rewards.shape
    next_value = rewards.new_zeros(B)  # V of the next real token (0 past the end)
    next_adv = rewards.new_zeros(B)  # Â of the next real token
    advantages = torch.zeros_like(rewards)
    for t in reversed(range(T)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]  # δ_t
        adv = delta + gamma * lam * next_adv  # Â_t = δ_t + γλ·Â_{t+1}
        m = mask[:, t]
        next_adv = torch.where(m, adv, next_adv)
        next_value = torch.where(m, values[:, t], next_value)
        advantages[:, t] = torch.where(m, adv, torch.zeros_like(adv))
    returns = torch.where(mask, advantages + values, torch.zeros_like(values))  # R = Â + V
    return advantages, returns


def token_mean(x, mask, num_tokens=None):
    """Σ x over the mask / num_tokens. num_tokens defaults to mask.sum(): the masked mean. Under DDP pass the GLOBAL
    token count of the minibatch, so each rank's value is its share and the shares add up over ranks (as sft_loss)."""
    return masked_mean(x, mask) if num_tokens is None else masked_sum(x, mask) / num_tokens


def ppo_policy_loss(logprobs, old_logprobs, advantages, mask, clip: float = 0.2, num_tokens=None):
    """PPO clipped surrogate (Schulman et al. 2017, eq. 7), token mean over the mask. Returns (loss, stats).

    stats: clipfrac (fraction of tokens where the clipped term is active), approx_kl = mean((ρ − 1) − log ρ),
    the k3 estimator of KL(π_old‖π) (as in cleanrl), and ratio (mean ρ). All detached.
    num_tokens: the divisor of every token sum (see token_mean); default mask.sum().
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)  # ρ = π/π_old
    pg1 = -advantages * ratio  # −Â·ρ
    pg2 = -advantages * ratio.clamp(1 - clip, 1 + clip)  # −Â·clip(ρ, 1−ε, 1+ε)
    loss = token_mean(torch.max(pg1, pg2), mask, num_tokens)  # L = mean max(−Âρ, −Â·clip(ρ))
    with torch.no_grad():
        stats = {"clipfrac": token_mean((pg2 > pg1).float(), mask, num_tokens),
                 "approx_kl": token_mean(torch.expm1(log_ratio) - log_ratio, mask, num_tokens),
                 "ratio": token_mean(ratio, mask, num_tokens)}
    return loss, stats


def ppo_value_loss(values, old_values, returns, mask, clip_v: float = 0.2, num_tokens=None):
    """Clipped value loss: ½·mean max((V − R)², (V_clip − R)²). Returns (loss, clipfrac). num_tokens: see token_mean."""
    values_clipped = old_values + (values - old_values).clamp(-clip_v, clip_v)  # V_clip = V_old + clip(V − V_old)
    vf1, vf2 = (values - returns) ** 2, (values_clipped - returns) ** 2
    loss = 0.5 * token_mean(torch.max(vf1, vf2), mask, num_tokens)
    clipfrac = token_mean((vf2 > vf1).float(), mask, num_tokens).detach()
    return loss, clipfrac


def rloo_advantages(scores, k: int):
    """REINFORCE leave-one-out (Ahmadian et al. 2024): A_i = r_i − mean of the other k−1 samples of its prompt.

    scores: (n_prompts·k,) with the k samples of each prompt consecutive. Returns (n_prompts·k,).
    """
    s = scores.view(-1, k)  # (n_prompts, k)
    baseline = (s.sum(dim=1, keepdim=True) - s) / (k - 1)
    return (s - baseline).reshape(-1)


def grpo_advantages(scores, k: int, scale_std: bool = True, eps: float = 1e-4):
    """GRPO (Shao et al. 2024): A_i = (r_i − mean_group) / (std_group + ε); scale_std=False is Dr.GRPO.

    scores: (n_prompts·k,), k consecutive samples per prompt; std is the unbiased group std, as in TRL.
    """
    s = scores.view(-1, k)
    adv = s - s.mean(dim=1, keepdim=True)
    if scale_std:
        adv = adv / (s.std(dim=1, keepdim=True) + eps)
    return adv.reshape(-1)


def explained_variance(values, returns, mask, dist_sum=None):
    """1 − Var(R − V) / Var(R) over the mask: 1 is a perfect critic, ≤ 0 no better than a constant. dist_sum: as in
    masked_mean (over every rank's entries)."""
    var_r = masked_var(returns, mask, unbiased=False, dist_sum=dist_sum)
    return 1 - masked_var(returns - values, mask, unbiased=False, dist_sum=dist_sum) / var_r
