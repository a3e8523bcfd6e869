"""nanoalign/losses.py: masked reductions and whitening (also over ranks), the SFT and Bradley-Terry losses, and
every DPO-family loss at hand-worked values and gradients (the RL side is tests/test_rl.py)."""
import math
import threading

import torch

from nanoalign.losses import (bradley_terry_loss, dpo_loss, ipo_loss, kto_loss, log1mexp, masked_mean, masked_sum,
                              orpo_loss, robust_dpo_loss, sft_loss, simpo_loss, whiten)
from nanoalign.rl import explained_variance

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
    assert close(masked_mean(x, torch.zeros_like(m)), 0.0)  # nothing unmasked: 0, not NaN


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


def test_sft_loss_grad_accumulation_equivalence():
    # summing micro-batch losses normalised by the GLOBAL token count == the one-big-batch loss
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
        for loss in (dpo_loss, robust_dpo_loss):  # at h = 0 every label-smoothed variant is ln 2 too
            losses, cr, rr = loss(lp, lp, lp, lp, beta, 0.1)
            assert close(losses, [math.log(2)] * 3)
            assert close(cr, 0.0) and close(rr, 0.0)


def _pair(loss=dpo_loss, beta=1.0, eps=0.0):
    # Δ_w = ln 3, Δ_l = 0, so β·h = ln 3: σ(βh) = 3/4, σ(−βh) = 1/4. -> (losses, rewards..., d loss / d log π(y_w))
    pc = t([LN3 - 5], requires_grad=True)
    losses, cr, rr = loss(pc, t([-7.0]), t([-5.0]), t([-7.0]), beta, eps)
    (grad,) = torch.autograd.grad(losses.sum(), pc)
    return losses.detach(), cr, rr, grad


def test_dpo_cdpo_robust_hand_values_and_gradients():
    losses, cr, rr, grad = _pair()
    assert close(losses, [math.log(4 / 3)]) and close(cr, [LN3]) and close(rr, [0.0])
    assert close(grad, [-0.25])  # −β·σ(−βh): the better the pair is already ranked, the smaller the push
    losses, _, _, grad = _pair(eps=0.1)  # cDPO: −(1−ε)log σ(βh) − ε log σ(−βh)
    assert close(losses, [0.9 * math.log(4 / 3) + 0.1 * math.log(4)])
    assert close(grad, [-0.9 * 0.25 + 0.1 * 0.75])  # −(1−ε)σ(−βh) + ε·σ(βh) = −0.15: ε pulls back toward h = 0
    losses, _, _, grad = _pair(robust_dpo_loss, eps=0.1)  # [−(1−ε)log σ(βh) + ε log σ(−βh)] / (1−2ε)
    assert close(losses, [(0.9 * math.log(4 / 3) - 0.1 * math.log(4)) / 0.8])
    assert close(grad, [(-0.9 * 0.25 - 0.1 * 0.75) / 0.8])  # −0.375: pushes harder than DPO, never back
    assert close(_pair(robust_dpo_loss)[0], [math.log(4 / 3)])  # ε = 0 is plain DPO
    losses, cr, rr, grad = _pair(beta=0.5)  # β scales the rewards and the gradient: β·h = ln 3 / 2
    assert close(cr, [0.5 * LN3]) and close(grad, [-0.5 / (1 + math.sqrt(3))])  # −β·σ(−βh), σ(−ln √3) = 1/(1+√3)


def test_ipo_hand_value_and_gradient():
    # per-token averages: Δ_w = −2 − (−4) = 2, Δ_l = −2.5 − (−1.5) = −1, h = 3, 1/(2β) = 1 -> (3 − 1)² = 4
    pc = t([-2.0], requires_grad=True)
    losses, cr, rr = ipo_loss(pc, t([-2.5]), t([-4.0]), t([-1.5]), 0.5)
    assert close(losses, [4.0]) and close(cr, [1.0]) and close(rr, [-0.5])
    assert close(torch.autograd.grad(losses.sum(), pc)[0], [4.0])  # 2(h − 1/(2β)): past the target it pulls back
    losses, _, _ = ipo_loss(t([-1.5]), t([-2.5]), t([-1.5]), t([-2.5]), 0.5)  # h = 0: (0 − 1)² = 1
    assert close(losses, [1.0])


def test_simpo_hand_value_and_gradient():
    # avg log π: chosen −1, rejected −2; β = 2, γ = 0.5 -> −log σ(2·1 − 0.5) = log(1 + e^−1.5)
    pc = t([-1.0], requires_grad=True)
    losses, cr, rr = simpo_loss(pc, t([-2.0]), 2.0, 0.5)
    assert close(losses, [math.log1p(math.exp(-1.5))]) and close(cr, [-2.0]) and close(rr, [-4.0])
    assert close(torch.autograd.grad(losses.sum(), pc)[0], [-2.0 / (1 + math.exp(1.5))])  # −β·σ(−(βΔ − γ))
    # γ is a margin: at equal log-probs the loss is −log σ(−γ), not ln 2
    assert close(simpo_loss(t([-1.0]), t([-1.0]), 2.0, 0.5)[0], [math.log1p(math.exp(0.5))])
    assert close(simpo_loss(t([-1.0]), t([-1.0]), 2.0, 0.5, 0.1)[0],
                 [0.9 * math.log1p(math.exp(0.5)) + 0.1 * math.log1p(math.exp(-0.5))])


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
                                   t([-4.0, -5.0]), beta=0.5)
    assert close(z0, 1.0)
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    assert close(losses, [1 - sig(0.5 * (2 - 1)), 1 - sig(0.5 * (1 + 2))])
    assert close(rewards, [1.0, -1.0])
    # a negative KL estimate is clamped to 0, and z0 carries no gradient
    kp = t([-5.0, -5.0], requires_grad=True)
    losses, _, z0 = kto_loss(t([-2.0]), t([-2.0]), t([True]), kp, t([-4.0, -4.0]), beta=0.5)
    assert z0.item() == 0.0 and not z0.requires_grad and close(losses, [0.5])  # Δ = z0 = 0: 1 − σ(0)
