"""RLHF as pure functions: the per-token KL estimators and β, rewards, GAE, the PPO losses, and the critic-free
RLOO / GRPO advantages. Conventions as in nanoalign/losses.py: (B, T) tensors with a 0/1 mask.
"""
import torch

from nanoalign.losses import masked_mean, masked_sum, masked_var
from nanoalign.model import last_token_index


def kl_penalty(logprobs, ref_logprobs, estimator: str = "k1"):
    """Per-token KL(π‖π_ref) estimate at the sampled token (Schulman 2020), with log r = log π_ref − log π:
    k1 = −log r (unbiased, can be < 0 per token); k3 = (r − 1) − log r (unbiased, ≥ 0 pointwise)."""
    log_r = ref_logprobs - logprobs
    return -log_r if estimator == "k1" else torch.expm1(log_r) - log_r


class KLController:
    """β, the KL coefficient: fixed (target = 0), or steered toward a target KL (Ziegler et al. 2019, §2.2):
    e = clip(KL/KL_target − 1, −0.2, 0.2);  β ← β·(1 + e·n/horizon), n = samples in the batch.
    OpenAI's values: β₀ = 0.15, target 6, horizon 10,000."""

    def __init__(self, kl_coef: float, target: float = 0.0, horizon: float = 10000.0):
        self.value, self.target, self.horizon = float(kl_coef), float(target), float(horizon)

    def update(self, current_kl: float, n_samples: int) -> float:
        if self.target > 0:
            error = min(max(float(current_kl) / self.target - 1, -0.2), 0.2)  # e = clip(KL/target − 1, ±0.2)
            self.value *= 1 + error * n_samples / self.horizon  # β ← β(1 + e·n/horizon)
        return self.value


def per_token_rewards(scores, logprobs, ref_logprobs, response_mask, kl_coef: float, estimator: str = "k1"):
    """RLHF rewards (Ziegler et al. 2019): r_t = −β·KL_t, plus the score at the last real response token.
    scores: (B,) reward-model or gold scores; logprobs, ref_logprobs, response_mask: (B, T).
    Returns (rewards (B, T), kl (B, T)), both 0 at padded positions."""
    kl = torch.where(response_mask.bool(), kl_penalty(logprobs, ref_logprobs, estimator), torch.zeros_like(logprobs))
    rewards = -kl_coef * kl  # r_t = −β·KL_t
    last = last_token_index(response_mask)  # (B,)
    rewards = rewards.scatter_add(1, last[:, None], scores[:, None].to(rewards.dtype))  # + score at the last token
    return rewards, kl


def gae(rewards, values, response_mask, gamma: float, lam: float):
    """Generalised advantage estimation (Schulman et al. 2016, eq. 16). Returns (advantages, returns), (B, T).
    δ_t = r_t + γ·V_{t+1} − V_t;  Â_t = δ_t + γλ·Â_{t+1};  R_t = Â_t + V_t;  V past the last real token = 0.
    Masked positions are skipped: "t+1" is the next REAL token, so padding (and any hole) contributes nothing, and
    advantages/returns are 0 there."""
    mask = response_mask.bool()
    B, T = rewards.shape
    next_value, next_adv = rewards.new_zeros(B), rewards.new_zeros(B)  # V and Â of the next real token
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


def ppo_policy_loss(logprobs, old_logprobs, advantages, mask, clip: float = 0.2, num_tokens=None, is_weights=None):
    """PPO clipped surrogate (Schulman et al. 2017, eq. 7), token mean over the mask. Returns (loss, stats).
    is_weights (B, T): each token's term times w_t (truncated importance sampling, w_t = min(π_old/π_sampler, C), for
    samples drawn from a policy other than π_old); None = 1. stats, detached: clipfrac (fraction of tokens where the
    clipped term is active), approx_kl = mean((ρ − 1) − log ρ), the k3 estimator of KL(π_old‖π) (as in cleanrl),
    ratio (mean ρ) and pg_loss. num_tokens: the divisor of every token sum (see token_mean)."""
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)  # ρ = π/π_old
    pg1 = -advantages * ratio  # −Â·ρ
    pg2 = -advantages * ratio.clamp(1 - clip, 1 + clip)  # −Â·clip(ρ, 1−ε, 1+ε)
    pg = torch.max(pg1, pg2) if is_weights is None else is_weights * torch.max(pg1, pg2)
    loss = token_mean(pg, mask, num_tokens)  # L = mean max(−Âρ, −Â·clip(ρ))
    with torch.no_grad():
        stats = {"clipfrac": token_mean((pg2 > pg1).float(), mask, num_tokens),
                 "approx_kl": token_mean(torch.expm1(log_ratio) - log_ratio, mask, num_tokens),
                 "ratio": token_mean(ratio, mask, num_tokens), "pg_loss": loss.detach()}
    return loss, stats


def ppo_value_loss(values, old_values, returns, mask, clip_v: float = 0.2, num_tokens=None):
    """Clipped value loss: ½·mean max((V − R)², (V_clip − R)²). Returns (loss, clipfrac). num_tokens: see token_mean."""
    values_clipped = old_values + (values - old_values).clamp(-clip_v, clip_v)  # V_clip = V_old + clip(V − V_old)
    vf1, vf2 = (values - returns) ** 2, (values_clipped - returns) ** 2
    loss = 0.5 * token_mean(torch.max(vf1, vf2), mask, num_tokens)
    clipfrac = token_mean((vf2 > vf1).float(), mask, num_tokens).detach()
    return loss, clipfrac


def rloo_advantages(scores, k: int, kl=None, kl_coef: float = 0.0):
    """REINFORCE leave-one-out (Ahmadian et al. 2024): A_i = R_i − mean of R over the other k−1 samples of its prompt,
    with the KL folded into the sequence reward (§3): R_i = score_i − β·Σ_t KL_t (kl (B, T), 0 on padding).
    scores: (n_prompts·k,) with the k samples of each prompt consecutive. Returns (n_prompts·k,)."""
    r = (scores if kl is None else scores - kl_coef * kl.sum(1)).view(-1, k)  # (n_prompts, k)
    baseline = (r.sum(dim=1, keepdim=True) - r) / (k - 1)
    return (r - baseline).reshape(-1)


def grpo_advantages(scores, k: int, eps: float = 1e-4):
    """GRPO (Shao et al. 2024, eq. 3): A_i = (r_i − mean_group) / (std_group + ε), the unbiased group std as in TRL.
    scores: (n_prompts·k,), k consecutive samples per prompt. The KL goes into the loss instead (β·k3, eq. 4)."""
    s = scores.view(-1, k)
    return ((s - s.mean(dim=1, keepdim=True)) / (s.std(dim=1, keepdim=True) + eps)).reshape(-1)


def entropy(logits):
    """Σ over the rows of logits (tokens, V) of H[π(·|s_t)] = −Σ_v π log π, in fp32 (the entropy bonus)."""
    logp = torch.log_softmax(logits.float(), -1)
    return -(logp.exp() * logp).sum()


def explained_variance(values, returns, mask, dist_sum=None):
    """1 − Var(R − V) / Var(R) over the mask: 1 is a perfect critic, ≤ 0 no better than a constant; 0 when R does not
    vary. dist_sum: as in masked_mean (over every rank's entries)."""
    var_r = masked_var(returns, mask, unbiased=False, dist_sum=dist_sum)
    return (1 - masked_var(returns - values, mask, unbiased=False, dist_sum=dist_sum) / var_r).nan_to_num(0.0, 0.0, 0.0)
