import math
import threading

import pytest
import torch

from nanoalign.losses import (bradley_terry_loss, kto_loss, log1mexp, masked_mean, masked_sum, orpo_loss,
                              preference_loss, sft_loss, whiten)
from nanoalign.rl import (AdaptiveKLController, FixedKLController, explained_variance, gae, grpo_advantages, kl_penalty,
                          per_token_rewards, ppo_policy_loss, ppo_value_loss, rloo_advantages, token_mean)

t = torch.tensor
LN3 = math.log(3)


def close(a, b, tol=1e-6):
    return torch.allclose(torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64),
                          atol=tol, rtol=0)


def test_masked_reductions_ignore_padding_even_if_nan():
    x = t([[1.0, 2.0, float("nan")], [4.0, float("-inf"), 0.0]])
    m = t([[1, 1, 0], [1, 0, 0]])
    assert close(masked_sum(x, m), 7.0)
    assert close(masked_mean(x, m), 7.0 / 3)
    assert close(masked_mean(x, m, dim=1), [1.5, 4.0])
    assert close(masked_mean(x, torch.zeros_like(m), dim=1), [0.0, 0.0])  # empty row: 0, not NaN


def test_whiten_masked_mean0_std1():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 10, generator=g) * 5 + 3
    m = (torch.rand(6, 10, generator=g) > 0.3).long()
    w = whiten(x, m)
    vals = w[m.bool()]
    assert abs(vals.mean().item()) < 1e-5
    assert abs(vals.std().item() - 1) < 1e-4  # unbiased std, like TRL's masked_var
    assert (w[~m.bool()] == 0).all()
    w2 = whiten(x, m, shift_mean=False)
    assert close(w2[m.bool()].mean(), x[m.bool()].mean(), 1e-4)



def two_ranks(fn, halves):
    """Simulated DDP: fn(*halves[r], dist_sum) for r = 0, 1, one thread per rank, where dist_sum (called in lockstep,
    like an all-reduce) returns the sum of both ranks' arguments. -> [rank 0's result, rank 1's result]."""
    barrier, slots, out = threading.Barrier(2), [None, None], [None, None]

    def rank(r):
        def dist_sum(x):
            slots[r] = x
            barrier.wait()
            total = slots[0] + slots[1]
            barrier.wait()  # both have read the slots before either writes the next call's
            return total
        out[r] = fn(*halves[r], dist_sum)
    threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return out


def test_whiten_and_explained_variance_over_ranks_equal_one_process():
    """dist_sum: two ranks, each holding one half of the rows, whiten exactly like one process holding both."""
    g = torch.Generator().manual_seed(0)
    x, v = torch.randn(6, 10, generator=g) * 5 + 3, torch.randn(6, 10, generator=g)
    m = (torch.rand(6, 10, generator=g) > 0.3).long()
    m[0] = 0  # an empty row: the halves hold different token counts
    halves = [(x[:3], v[:3], m[:3]), (x[3:], v[3:], m[3:])]
    w0, w1 = two_ranks(lambda xs, vs, ms, ds: whiten(xs, ms, dist_sum=ds), halves)
    assert close(torch.cat([w0, w1]), whiten(x, m), 1e-5)
    w0, w1 = two_ranks(lambda xs, vs, ms, ds: whiten(xs, ms, shift_mean=False, dist_sum=ds), halves)
    assert close(torch.cat([w0, w1]), whiten(x, m, shift_mean=False), 1e-5)
    assert not close(whiten(x[:3], m[:3]), whiten(x, m)[:3], 1e-2)  # whitening each half alone differs
    e0, e1 = two_ranks(lambda xs, vs, ms, ds: explained_variance(vs, xs, ms, dist_sum=ds), halves)
    assert close(e0, explained_variance(v, x, m), 1e-6) and close(e1, e0, 0)


def test_ppo_losses_with_the_global_token_count_add_up_over_shares():
    """num_tokens = the minibatch's token count over all ranks: each rank's loss, stats and gradient are shares of
    the whole minibatch's token means (the default, num_tokens = mask.sum(), is that mean for one process)."""
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

def test_sft_loss_grad_accumulation_equivalence():
    # pitfall 7: summing micro-batch losses normalised by the GLOBAL token count == the one-big-batch loss
    g = torch.Generator().manual_seed(0)
    logps = (-torch.rand(8, 12, generator=g) * 3).requires_grad_()
    lengths = t([12, 3, 7, 1, 9, 12, 5, 2])
    mask = (torch.arange(12)[None] < lengths[:, None]).long()
    big = sft_loss(logps, mask)
    (big_grad,) = torch.autograd.grad(big, logps)
    n = mask.sum()
    accum = sum(sft_loss(logps[i:i + 1], mask[i:i + 1], num_tokens=n) for i in range(8))
    (acc_grad,) = torch.autograd.grad(accum, logps)
    assert close(accum, big) and torch.allclose(acc_grad, big_grad)
    # the per-micro-batch mean (the bug) gives a different answer for unequal lengths
    buggy = sum(sft_loss(logps[i:i + 1], mask[i:i + 1]) for i in range(8)) / 8
    assert not close(buggy, big, 1e-3)
    assert close(big, -(logps * mask).sum() / n)


def test_bradley_terry_hand_values():
    rc, rr = t([2.0, 0.0]), t([1.0, 0.0])
    assert close(bradley_terry_loss(rc, rr), [math.log1p(math.exp(-1)), math.log(2)])
    assert close(bradley_terry_loss(rc, rr, margin=t([1.0, 0.0])), [math.log(2), math.log(2)])
    assert close(bradley_terry_loss(rc, rr, center_coef=0.01), [math.log1p(math.exp(-1)) + 0.09, math.log(2)])


def test_dpo_at_equal_logps_is_ln2():
    lp = t([-5.0, -20.0, -1.0])
    for beta in (0.1, 1.0, 3.0):
        losses, cr, rr = preference_loss(lp, lp, lp, lp, beta)
        assert close(losses, [math.log(2)] * 3)
        assert close(cr, 0.0) and close(rr, 0.0)


def _pair(beta=1.0, **kw):
    # Δ_w = ln 3, Δ_l = 0, so β·h = ln 3: σ(βh) = 3/4, σ(−βh) = 1/4
    return preference_loss(t([LN3 - 5]), t([-7.0]), t([-5.0]), t([-7.0]), beta, **kw)


def test_dpo_cdpo_robust_hand_values():
    losses, cr, rr = _pair()
    assert close(losses, [math.log(4 / 3)]) and close(cr, [LN3]) and close(rr, [0.0])
    cdpo = 0.9 * math.log(4 / 3) + 0.1 * math.log(4)  # −(1−ε)log σ(βh) − ε log σ(−βh)
    assert close(_pair(loss_type="cdpo", label_smoothing=0.1)[0], [cdpo])
    assert close(_pair(loss_type="sigmoid", label_smoothing=0.1)[0], [cdpo])
    robust = (0.9 * math.log(4 / 3) - 0.1 * math.log(4)) / 0.8  # [−(1−ε)log σ(βh) + ε log σ(−βh)]/(1−2ε)
    assert close(_pair(loss_type="robust", label_smoothing=0.1)[0], [robust])
    assert close(_pair(loss_type="robust")[0], [math.log(4 / 3)])  # ε = 0 is plain DPO


def test_dpo_gradient_sign():
    pc = t([-5.0], requires_grad=True)
    losses, _, _ = preference_loss(pc, t([-5.0]), t([-5.0]), t([-5.0]), 0.1)
    losses.sum().backward()
    assert close(pc.grad, [-0.1 * 0.5])  # dL/dΔ_w = −β·σ(−βh) = −β/2 at h = 0


def test_ipo_length_normalised_hand_value():
    # avg Δ_w = (−4 − −8)/2 = 2, avg Δ_l = (−10 − −6)/4 = −1, h = 3, 1/(2β) = 1 -> (3 − 1)² = 4
    losses, cr, rr = preference_loss(t([-4.0]), t([-10.0]), t([-8.0]), t([-6.0]), 0.5, loss_type="ipo",
                                     chosen_lengths=t([2.0]), rejected_lengths=t([4.0]))
    assert close(losses, [4.0]) and close(cr, [1.0]) and close(rr, [-0.5])
    with pytest.raises(ValueError):
        preference_loss(t([-4.0]), t([-10.0]), t([-8.0]), t([-6.0]), 0.5, loss_type="ipo")


def test_simpo_hand_value_reference_free():
    # avg logp: chosen −2/2 = −1, rejected −8/4 = −2; β = 2, γ = 0.5 -> −log σ(2·1 − 0.5)
    ref = t([123.0])  # ignored: SimPO has no reference model
    losses, cr, rr = preference_loss(t([-2.0]), t([-8.0]), ref, ref, 2.0, loss_type="simpo", gamma=0.5,
                                     chosen_lengths=t([2]), rejected_lengths=t([4]))
    assert close(losses, [math.log1p(math.exp(-1.5))]) and close(cr, [-2.0]) and close(rr, [-4.0])


def test_orpo_hand_value():
    # p_w = 0.5 -> odds 1; p_l = 0.2 -> odds 1/4; log σ(ln 4) = ln 0.8
    losses, cr, rr = orpo_loss(t([math.log(0.5)]), t([math.log(0.2)]), t([0.7]), lam=0.1)
    assert close(losses, [0.7 - 0.1 * math.log(0.8)])
    assert close(cr, [0.1 * math.log(0.5)]) and close(rr, [0.1 * math.log(0.2)])


def test_orpo_numerically_safe_at_extremes():
    a = t([-1e-9, -1e-4, -0.5, -30.0, -200.0], requires_grad=True)
    losses, _, _ = orpo_loss(a, a.detach().flip(0), t(0.0))
    losses.sum().backward()
    assert torch.isfinite(losses).all() and torch.isfinite(a.grad).all()
    x = t([-1e-6, -1e-4, -0.3, -0.7, -5.0, -40.0])  # log(1 − eˣ) in fp32 against a float64 reference
    assert torch.allclose(log1mexp(x).double(), torch.log(-torch.expm1(x.double())), rtol=1e-5, atol=1e-12)


def test_kto_hand_values():
    # z0 = mean([−3 − −4, −4 − −5]) = 1; Δ = [2, −2]; β = 0.5
    losses, rewards, z0 = kto_loss(t([-2.0, -6.0]), t([-4.0, -4.0]), t([True, False]), t([-3.0, -4.0]),
                                   t([-4.0, -5.0]), beta=0.5, undesirable_weight=2.0)
    assert close(z0, 1.0)
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    assert close(losses, [1 - sig(0.5 * (2 - 1)), 2 * (1 - sig(0.5 * (1 + 2)))])
    assert close(rewards, [1.0, -1.0])
    # a negative KL estimate is clamped to 0, and z0 carries no gradient
    kp = t([-5.0, -5.0], requires_grad=True)
    _, _, z0 = kto_loss(t([-2.0]), t([-2.0]), t([True]), kp, t([-4.0, -4.0]), beta=0.5)
    assert z0.item() == 0.0 and not z0.requires_grad


def test_kl_estimators_hand_values_and_signs():
    lp, ref = t([math.log(0.5)]), t([math.log(0.25)])  # r = π_ref/π = 0.5
    assert close(kl_penalty(lp, ref, "k1"), [math.log(2)])
    assert close(kl_penalty(lp, ref, "k2"), [0.5 * math.log(2) ** 2])
    assert close(kl_penalty(lp, ref, "k3"), [-0.5 + math.log(2)])
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(1000, generator=g) * 3, torch.randn(1000, generator=g) * 3
    assert (kl_penalty(a, b, "k3") >= 0).all() and (kl_penalty(a, b, "k2") >= 0).all()
    with pytest.raises(ValueError):
        kl_penalty(a, b, "k4")


def test_kl_estimators_unbiased_under_pure_sampling():
    # pitfall 5: with tokens sampled from π itself, E[k1] = E[k3] = KL(π‖π_ref) ≥ 0, even though k1 can be < 0
    g = torch.Generator().manual_seed(0)
    logp = torch.log_softmax(torch.randn(50, generator=g), -1)
    logq = torch.log_softmax(torch.randn(50, generator=g), -1)
    kl = (logp.exp() * (logp - logq)).sum()
    y = torch.multinomial(logp.exp(), 200_000, replacement=True, generator=g)
    k1, k3 = kl_penalty(logp[y], logq[y], "k1"), kl_penalty(logp[y], logq[y], "k3")
    assert (k1 < 0).any()
    assert k1.mean() > 0 and abs(k1.mean() - kl) < 0.02 and abs(k3.mean() - kl) < 0.02


def test_adaptive_kl_controller():
    c = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    assert close(c.update(6.6, 100), 0.1 * (1 + 0.1 * 100 / 10000))  # e = 0.1 -> β = 0.1001
    c = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    assert close(c.update(9.0, 100), 0.1002)  # e = 0.5 clipped to 0.2: β goes up
    c = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    assert close(c.update(1.0, 100), 0.0998)  # e = −0.83 clipped to −0.2: β goes down
    d = AdaptiveKLController(1.0)
    d.load_state_dict(c.state_dict())
    assert d.value == c.value and d.update(3.0, 10) == c.update(3.0, 10)
    assert all(isinstance(v, float) for v in c.state_dict().values())
    f = FixedKLController(0.05)
    assert f.update(100.0, 64) == 0.05 and f.state_dict() == {"value": 0.05}


def test_per_token_rewards_score_at_last_real_token():
    mask = t([[1, 1, 1, 0], [1, 1, 0, 0]])
    lp = t([[-1.0, -2.0, -1.0, -9.0], [-1.0, -1.0, -9.0, -9.0]])
    ref = t([[-1.5, -1.0, -1.0, 0.0], [-2.0, -1.0, 0.0, 0.0]])
    rewards, kl = per_token_rewards(t([1.0, 2.0]), lp, ref, mask, kl_coef=0.1)
    assert close(kl, [[0.5, -1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    assert close(rewards, [[-0.05, 0.1, 1.0, 0.0], [-0.1, 2.0, 0.0, 0.0]])


def _naive_gae(rewards, values, mask, gamma, lam):
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
    lengths = t([9, 1, 4, 0, 7, 3])
    right_padded = (torch.arange(T)[None] < lengths[:, None]).long()
    holes = (torch.rand(B, T, generator=g) > 0.4).long()  # arbitrary masks: padding skipped wherever it is
    for mask in (right_padded, holes):
        for gamma, lam in ((1.0, 0.95), (0.9, 0.8), (1.0, 1.0)):
            adv, ret = gae(rewards, values, mask, gamma, lam)
            ref = _naive_gae(rewards, values, mask, gamma, lam)
            assert close(adv, ref, 1e-5)
            assert close(ret, torch.where(mask.bool(), ref + values, 0.0), 1e-5)
    # values/rewards at padded positions must not matter
    junk = torch.where(right_padded.bool(), rewards, 1e6)
    assert close(gae(junk, values, right_padded, 1.0, 0.95)[0], gae(rewards, values, right_padded, 1.0, 0.95)[0])


def test_ppo_policy_loss_clipping_worked_numbers():
    # ratios 1.5, 0.5, 1.5, 0.5 with advantages +1, +1, −1, −1 and clip 0.2:
    # max(−Âρ, −Â·clip(ρ)) = max(−1.5, −1.2), max(−0.5, −0.8), max(1.5, 1.2), max(0.5, 0.8) = −1.2, −0.5, 1.5, 0.8
    old = torch.zeros(1, 5)
    lp = torch.log(t([[1.5, 0.5, 1.5, 0.5, 100.0]])).requires_grad_()
    adv = t([[1.0, 1.0, -1.0, -1.0, 50.0]])
    mask = t([[1, 1, 1, 1, 0]])
    loss, stats = ppo_policy_loss(lp, old, adv, mask, clip=0.2)
    assert close(loss, (-1.2 - 0.5 + 1.5 + 0.8) / 4)
    assert close(stats["clipfrac"], 0.5)
    assert close(stats["approx_kl"], ((0.5 - math.log(1.5)) * 2 + (-0.5 - math.log(0.5)) * 2) / 4)
    loss.backward()
    # clipped tokens get no gradient; unclipped ones get −Â·ρ / n_tokens
    assert close(lp.grad, [[0.0, -0.5 / 4, 1.5 / 4, 0.0, 0.0]])


def test_ppo_value_loss_worked_numbers():
    old, ret = t([[0.0, 0.0, 0.0]]), t([[1.0, 1.0, 0.0]])
    v = t([[0.5, -0.5, 9.0]])
    loss, clipfrac = ppo_value_loss(v, old, ret, t([[1, 1, 0]]), clip_v=0.2)
    # token 1: (0.5−1)² = .25 vs (0.2−1)² = .64 -> .64 ; token 2: (−0.5−1)² = 2.25 vs (−0.2−1)² = 1.44 -> 2.25
    assert close(loss, 0.5 * (0.64 + 2.25) / 2) and close(clipfrac, 0.5)


def test_rloo_and_grpo_worked_numbers():
    scores = t([1.0, 2.0, 3.0, 4.0, 4.0, 4.0])
    assert close(rloo_advantages(scores, 3), [-1.5, 0.0, 1.5, 0.0, 0.0, 0.0])  # r_i − mean(others)
    assert close(grpo_advantages(scores, 3), [-1 / 1.0001, 0.0, 1 / 1.0001, 0.0, 0.0, 0.0])  # std of 1,2,3 = 1
    assert close(grpo_advantages(scores, 3, scale_std=False), [-1.0, 0.0, 1.0, 0.0, 0.0, 0.0])
    assert close(rloo_advantages(t([0.0, 1.0]), 2), [-1.0, 1.0])


def test_explained_variance():
    g = torch.Generator().manual_seed(0)
    ret = torch.randn(4, 6, generator=g)
    mask = torch.ones(4, 6)
    mask[0, 3:] = 0
    assert close(explained_variance(ret, ret, mask), 1.0)
    const = torch.full_like(ret, ret[mask.bool()].mean().item())
    assert close(explained_variance(const, ret, mask), 0.0, 1e-5)
    assert close(explained_variance(torch.where(mask.bool(), ret, 1e6), ret, mask), 1.0)  # padding ignored


def test_losses_are_differentiable_per_pair():
    # every DPO variant returns one loss per pair and gives finite gradients
    g = torch.Generator().manual_seed(0)
    pc, pr = (-torch.rand(4, generator=g) * 20).requires_grad_(), (-torch.rand(4, generator=g) * 20).requires_grad_()
    rc, rr = -torch.rand(4, generator=g) * 20, -torch.rand(4, generator=g) * 20
    lc, lr = t([3.0, 5.0, 7.0, 9.0]), t([2.0, 4.0, 6.0, 8.0])
    for lt in ("sigmoid", "cdpo", "robust", "ipo", "simpo"):
        losses, _, _ = preference_loss(pc, pr, rc, rr, 0.1, lt, label_smoothing=0.1, chosen_lengths=lc,
                                       rejected_lengths=lr)
        gc, gr = torch.autograd.grad(losses.sum(), (pc, pr))
        assert losses.shape == (4,) and torch.isfinite(gc).all() and (gc <= 0).all() and (gr >= 0).all(), lt
