"""nanoalign/rl.py: hand-worked values for every estimator, loss and advantage that train_ppo.py uses."""
import math

import pytest
import torch

from nanoalign.rl import (KLController, entropy, explained_variance, gae, grpo_advantages, kl_penalty,
                          per_token_rewards, ppo_policy_loss, ppo_value_loss, rloo_advantages, token_mean)

t = torch.tensor
LN2 = math.log(2)


def close(a, b, tol=1e-6):
    return torch.allclose(torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64),
                          atol=tol, rtol=0)


def test_kl_estimators_hand_values():
    lp, ref = t([math.log(0.5), math.log(0.25)]), t([math.log(0.25), math.log(0.5)])  # r = π_ref/π = 0.5, then 2
    assert close(kl_penalty(lp, ref, "k1"), [LN2, -LN2])  # −log r: negative where π_ref > π
    assert close(kl_penalty(lp, ref, "k3"), [-0.5 + LN2, 1 - LN2])  # (r − 1) − log r


def test_kl_estimators_unbiased_under_pure_sampling():
    # tokens sampled from π itself: E[k1] = E[k3] = KL(π‖π_ref), though k1 is negative on some tokens
    g = torch.Generator().manual_seed(0)
    logp = torch.log_softmax(torch.randn(50, generator=g), -1)
    logq = torch.log_softmax(torch.randn(50, generator=g), -1)
    kl = (logp.exp() * (logp - logq)).sum()
    y = torch.multinomial(logp.exp(), 200_000, replacement=True, generator=g)
    k1, k3 = kl_penalty(logp[y], logq[y], "k1"), kl_penalty(logp[y], logq[y], "k3")
    assert (k1 < 0).any()
    assert abs(k1.mean() - kl) < 0.02 and abs(k3.mean() - kl) < 0.02


def test_kl_controller_fixed_and_adaptive_hand_worked():
    # Ziegler et al. 2019: e = clip(KL/target − 1, ±0.2); β ← β(1 + e·n/horizon)
    assert KLController(0.1, 6.0, 10000).update(6.6, 1000) == pytest.approx(0.1 * 1.01)  # e = 0.1 inside the clip
    assert KLController(0.1, 6.0, 10000).update(12.0, 1000) == pytest.approx(0.1 * 1.02)  # e = 1 clipped to 0.2
    assert KLController(0.1, 6.0, 10000).update(1.0, 100) == pytest.approx(0.0998)  # e = −0.83 clipped to −0.2
    fixed = KLController(0.05)  # target 0: β never moves
    assert fixed.update(100.0, 64) == 0.05 and fixed.update(0.0, 64) == 0.05


def test_per_token_rewards_score_at_last_real_token():
    mask = t([[1, 1, 1, 0], [1, 1, 0, 0]])
    lp = t([[-1.0, -2.0, -1.0, -9.0], [-1.0, -1.0, -9.0, -9.0]])
    ref = t([[-1.5, -1.0, -1.0, 0.0], [-2.0, -1.0, 0.0, 0.0]])
    rewards, kl = per_token_rewards(t([1.0, 2.0]), lp, ref, mask, kl_coef=0.1)
    assert close(kl, [[0.5, -1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    assert close(rewards, [[-0.05, 0.1, 1.0, 0.0], [-0.1, 2.0, 0.0, 0.0]])
    # k3 (r − 1) − log r with log r = ref − lp: e^−0.5 − 1 + 0.5, e^1 − 1 − 1, 0
    _, kl3 = per_token_rewards(t([1.0, 2.0]), lp, ref, mask, kl_coef=0.1, estimator="k3")
    assert close(kl3[0], [math.exp(-0.5) - 0.5, math.e - 2, 0.0, 0.0])


def naive_gae(rewards, values, mask, gamma, lam):
    """Compress each row to its real tokens, then Â_t = Σ_l (γλ)^l δ_{t+l}: an independent double loop."""
    B, T = rewards.shape
    adv = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        idx = [i for i in range(T) if mask[b, i]]
        r = [rewards[b, i].item() for i in idx]
        v = [values[b, i].item() for i in idx] + [0.0]  # V past the end = 0
        deltas = [r[i] + gamma * v[i + 1] - v[i] for i in range(len(idx))]
        for i, pos in enumerate(idx):
            adv[b, pos] = sum((gamma * lam) ** j * deltas[i + j] for j in range(len(idx) - i))
    return adv


def test_gae_matches_naive_double_loop_with_padding():
    g = torch.Generator().manual_seed(0)
    B, T = 6, 9
    rewards, values = torch.randn(B, T, generator=g), torch.randn(B, T, generator=g)
    right_padded = (torch.arange(T)[None] < t([9, 1, 4, 0, 7, 3])[:, None]).long()
    holes = (torch.rand(B, T, generator=g) > 0.4).long()  # padding skipped wherever it is
    for mask in (right_padded, holes):
        for gamma, lam in ((1.0, 0.95), (0.9, 0.8), (1.0, 1.0)):
            adv, ret = gae(rewards, values, mask, gamma, lam)
            ref = naive_gae(rewards, values, mask, gamma, lam)
            assert close(adv, ref, 1e-5) and close(ret, torch.where(mask.bool(), ref + values, 0.0), 1e-5)
    junk = torch.where(right_padded.bool(), rewards, 1e6)  # values at padded positions must not matter
    assert close(gae(junk, values, right_padded, 1.0, 0.95)[0], gae(rewards, values, right_padded, 1.0, 0.95)[0])


def test_gae_hand_worked():
    # r = [0, 1], V = [0.5, 0.2], γ = 0.9, λ = 0.5: δ_1 = 1 − 0.2 = 0.8, δ_0 = 0 + 0.9·0.2 − 0.5 = −0.32,
    # Â_1 = 0.8, Â_0 = −0.32 + 0.45·0.8 = 0.04; R = Â + V
    adv, ret = gae(t([[0.0, 1.0]]), t([[0.5, 0.2]]), t([[1, 1]]), 0.9, 0.5)
    assert close(adv, [[0.04, 0.8]]) and close(ret, [[0.54, 1.0]])


def test_ppo_policy_loss_clipping_worked_numbers():
    # ratios 1.5, 0.5, 1.5, 0.5 with advantages +1, +1, −1, −1 and clip 0.2:
    # max(−Âρ, −Â·clip(ρ)) = max(−1.5, −1.2), max(−0.5, −0.8), max(1.5, 1.2), max(0.5, 0.8) = −1.2, −0.5, 1.5, 0.8
    old = torch.zeros(1, 5)
    lp = torch.log(t([[1.5, 0.5, 1.5, 0.5, 100.0]])).requires_grad_()
    adv, mask = t([[1.0, 1.0, -1.0, -1.0, 50.0]]), t([[1, 1, 1, 1, 0]])
    loss, stats = ppo_policy_loss(lp, old, adv, mask, clip=0.2)
    assert close(loss, (-1.2 - 0.5 + 1.5 + 0.8) / 4)
    assert close(stats["clipfrac"], 0.5) and close(stats["ratio"], 1.0) and torch.equal(stats["pg_loss"], loss.detach())
    assert close(stats["approx_kl"], ((0.5 - math.log(1.5)) * 2 + (-0.5 - math.log(0.5)) * 2) / 4)
    loss.backward()
    assert close(lp.grad, [[0.0, -0.5 / 4, 1.5 / 4, 0.0, 0.0]])  # clipped tokens: no gradient; else −Â·ρ / n


def test_truncated_importance_weights_scale_each_tokens_term():
    # the same tokens with w = min(π_old/π_sampler, C) = 0.5, 2, 1, 3 (the last masked): each term times its weight
    old = torch.zeros(1, 5)
    lp = torch.log(t([[1.5, 0.5, 1.5, 0.5, 100.0]])).requires_grad_()
    adv, mask = t([[1.0, 1.0, -1.0, -1.0, 50.0]]), t([[1, 1, 1, 1, 0]])
    w = t([[0.5, 2.0, 1.0, 1.0, 3.0]])
    loss, stats = ppo_policy_loss(lp, old, adv, mask, 0.2, is_weights=w)
    assert close(loss, (0.5 * -1.2 + 2 * -0.5 + 1.5 + 0.8) / 4)
    assert close(stats["clipfrac"], 0.5)  # the stats describe ρ = π/π_old, whatever the weights
    loss.backward()
    assert close(lp.grad, [[0.0, 2 * -0.5 / 4, 1.5 / 4, 0.0, 0.0]])
    assert close(ppo_policy_loss(lp, old, adv, mask, 0.2, is_weights=torch.ones(1, 5))[0],
                 ppo_policy_loss(lp, old, adv, mask, 0.2)[0], 0)  # weights of 1 change nothing


def test_ppo_value_loss_worked_numbers():
    old, ret = t([[0.0, 0.0, 0.0]]), t([[1.0, 1.0, 0.0]])
    loss, clipfrac = ppo_value_loss(t([[0.5, -0.5, 9.0]]), old, ret, t([[1, 1, 0]]), clip_v=0.2)
    # token 1: (0.5−1)² = .25 vs (0.2−1)² = .64 -> .64 ; token 2: (−0.5−1)² = 2.25 vs (−0.2−1)² = 1.44 -> 2.25
    assert close(loss, 0.5 * (0.64 + 2.25) / 2) and close(clipfrac, 0.5)


def test_ppo_losses_with_the_global_token_count_add_up_over_shares():
    """num_tokens = the minibatch's token count over all ranks: each rank's loss, stats and gradient are shares of
    the whole minibatch's token means."""
    g = torch.Generator().manual_seed(1)
    lp, old = (torch.randn(4, 5, generator=g) * 0.3).requires_grad_(), torch.randn(4, 5, generator=g) * 0.3
    adv, v, ret = torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g).requires_grad_(), torch.randn(4, 5)
    m = t([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 0, 0]])  # shares of 7 and 4 tokens
    whole, stats = ppo_policy_loss(lp, old, adv, m, 0.2)
    vf, vf_clip = ppo_value_loss(v, old, ret, m, 0.2)
    (whole + vf).backward()
    grads = lp.grad.clone(), v.grad.clone()
    lp.grad = v.grad = None
    n = m.sum().float()
    parts = [(ppo_policy_loss(lp[s], old[s], adv[s], m[s], 0.2, n), ppo_value_loss(v[s], old[s], ret[s], m[s], 0.2, n))
             for s in (slice(0, 2), slice(2, 4))]
    sum(p[0][0] + p[1][0] for p in parts).backward()
    assert close(sum(p[0][0] for p in parts), whole) and close(sum(p[1][0] for p in parts), vf)
    for key in stats:
        assert close(sum(p[0][1][key] for p in parts), stats[key]), key
    assert close(sum(p[1][1] for p in parts), vf_clip)
    assert close(lp.grad, grads[0]) and close(v.grad, grads[1])
    assert close(token_mean(t([[2.0, 4.0, 9.0]]), t([[1, 1, 0]]), 4.0), 1.5)  # Σ over the mask / num_tokens


def test_rloo_folds_the_kl_into_the_sequence_reward():
    scores = t([1.0, 2.0, 3.0, 4.0, 4.0, 4.0])
    assert close(rloo_advantages(scores, 3), [-1.5, 0.0, 1.5, 0.0, 0.0, 0.0])  # r_i − mean(others)
    # R = score − β·Σ_t KL_t with β = 0.5: KL sums 2, 0, 0 | 0, 0, 1 (padding 0) -> R = 0, 2, 3 | 4, 4, 3.5
    kl = t([[1.0, 1.0], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [0.5, 0.5]])
    assert close(rloo_advantages(scores, 3, kl, 0.5), [0 - 2.5, 2 - 1.5, 3 - 1.0, 4 - 3.75, 4 - 3.75, 3.5 - 4])
    assert close(rloo_advantages(scores, 3, kl, 0.0), rloo_advantages(scores, 3))


def test_grpo_advantages_and_its_k3_term():
    scores = t([1.0, 2.0, 3.0, 4.0, 4.0, 4.0])
    assert close(grpo_advantages(scores, 3), [-1 / 1.0001, 0.0, 1 / 1.0001, 0.0, 0.0, 0.0])  # unbiased std of 1,2,3 = 1
    # GRPO's loss term β·mean_t k3 (Shao et al. 2024, eq. 4): r = π_ref/π = 0.5 and 1 on two tokens, a third masked
    lp, ref = t([[math.log(0.5), -1.0, -3.0]]), t([[math.log(0.25), -1.0, 0.0]])
    term = 0.1 * token_mean(kl_penalty(lp, ref, "k3"), t([[1, 1, 0]]))
    assert close(term, 0.1 * (-0.5 + LN2 + 0.0) / 2)


def test_entropy_hand_worked():
    # two tokens: uniform -> ln 2; probabilities 3/4, 1/4 -> −(3/4)·ln(3/4) − (1/4)·ln(1/4); summed over the rows
    h = entropy(t([[0.0, 0.0], [math.log(3), 0.0]]))
    assert close(h, math.log(2) - 0.75 * math.log(0.75) - 0.25 * math.log(0.25))


def test_explained_variance():
    g = torch.Generator().manual_seed(0)
    ret = torch.randn(4, 6, generator=g)
    mask = torch.ones(4, 6)
    mask[0, 3:] = 0
    assert close(explained_variance(ret, ret, mask), 1.0)
    const = torch.full_like(ret, ret[mask.bool()].mean().item())
    assert close(explained_variance(const, ret, mask), 0.0, 1e-5)
    assert close(explained_variance(torch.where(mask.bool(), ret, 1e6), ret, mask), 1.0)  # padding ignored
    # hand-worked: R = [1, 3], V = [0, 2]: Var(R − V) = 0 -> 1; V = [2, 2]: Var([−1, 1]) = 1 = Var(R) -> 0
    assert close(explained_variance(t([[2.0, 2.0]]), t([[1.0, 3.0]]), t([[1, 1]])), 0.0)
    assert explained_variance(t([[0.0, 1.0]]), t([[2.0, 2.0]]), t([[1, 1]])) == 0  # R constant: 0/0, logged as 0
