import torch
import torch._dynamo

from nanoalign.logprobs import last_token_rewards, logprobs_chunked, logprobs_naive, token_logprobs
from nanoalign.model import PRESETS, ModelConfig, Transformer, last_token_index
from nanoalign.packing import segment_mask


def _inputs(B=3, T=37, C=48, V=97, seed=0, w_grad=True):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, C, generator=g).requires_grad_()
    weight = (torch.randn(V, C, generator=g) * 0.3).requires_grad_(w_grad)
    labels = torch.randint(0, V, (B, T), generator=g)
    upstream = torch.randn(B, T, generator=g)  # a non-uniform gradient, as PPO's per-token loss gives
    return hidden, weight, labels, upstream


def _value_and_grads(fn, hidden, weight, labels, upstream, **kw):
    out = fn(hidden, weight, labels, **kw)
    wrt = (hidden, weight) if weight.requires_grad else (hidden,)
    return (out, *torch.autograd.grad((out * upstream).sum(), wrt))


def test_chunked_equals_naive_values_and_grads():
    hidden, weight, labels, up = _inputs()
    ref = _value_and_grads(logprobs_naive, hidden, weight, labels, up, temperature=0.7)
    for chunk in (10, 4096):  # chunk sizes that do and don't divide B·T = 111 (near-equal chunks of 10–11)
        got = _value_and_grads(logprobs_chunked, hidden, weight, labels, up, temperature=0.7, chunk=chunk)
        for a, b in zip(got, ref):
            assert a.shape == b.shape and torch.allclose(a, b, atol=1e-5, rtol=0), chunk


def test_chunked_frozen_head_grads_equal_naive():
    # W without grad (LoRA): the h-gradient is computed in the forward pass; it must still be exact
    hidden, weight, labels, up = _inputs(w_grad=False)
    ref = _value_and_grads(logprobs_naive, hidden, weight, labels, up, temperature=1.3)
    got = _value_and_grads(logprobs_chunked, hidden, weight, labels, up, temperature=1.3, chunk=16)
    for a, b in zip(got, ref):
        assert torch.allclose(a, b, atol=1e-5, rtol=0)


def test_chunked_gradcheck_float64():
    hidden, weight, labels, _ = _inputs(B=2, T=5, C=6, V=11)
    h, w = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    assert torch.autograd.gradcheck(lambda h, w: logprobs_chunked(h, w, labels, 0.5, chunk=3), (h, w))


def test_logprobs_are_normalised_and_temperature_divides_logits():
    hidden, weight, _, _ = _inputs(B=1, T=4, V=13)
    V = weight.shape[0]
    for temp in (1.0, 0.5, 2.0):
        # Σ_y p(y) = 1 over the whole vocabulary, for each position
        all_y = torch.arange(V).repeat(4)
        lp = logprobs_chunked(hidden[0].repeat_interleave(V, 0), weight, all_y, temp, chunk=7).view(4, V)
        assert torch.allclose(lp.exp().sum(-1), torch.ones(4), atol=1e-5)
        expect = torch.log_softmax(hidden[0] @ weight.T / temp, -1)
        assert torch.allclose(lp, expect, atol=1e-5)


def test_far_tail_log_prob_is_exact():
    # logits (0, -200): p(y=1) = e^-200 is below fp32's range, so log(softmax) would give -inf; the log-prob is read off
    # the log-softmax instead, -200 − log(1 + e^-200) = -200, and its h-gradient W[1] − softmax·W is -200 too
    hidden, weight = torch.ones(1, 1, requires_grad=True), torch.tensor([[0.0], [-200.0]])
    for w in (weight, weight.clone().requires_grad_()):  # the frozen-W path and the trainable-W path
        lp = logprobs_chunked(hidden, w, torch.tensor([1]))
        (grad_h,) = torch.autograd.grad(lp.sum(), hidden)
        assert lp.item() == -200.0 and grad_h.item() == -200.0


def test_fp32_under_bf16_autocast():
    # log-probs stay fp32 under bf16 autocast, and the matmul is not silently done in bf16
    hidden, weight, labels, _ = _inputs(C=64, V=300)
    h16 = hidden.detach().bfloat16().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = logprobs_chunked(h16, weight, labels, chunk=32)
        naive = logprobs_naive(h16, weight, labels)
        bf16_matmul = torch.log_softmax(h16 @ weight.T, -1).gather(-1, labels[..., None])[..., 0]
    exact = logprobs_naive(h16.float(), weight, labels)
    assert out.dtype == torch.float32 and naive.dtype == torch.float32
    assert torch.allclose(out, exact, atol=1e-5) and torch.allclose(naive, exact, atol=1e-5)
    assert (bf16_matmul.float() - exact).abs().max() > 1e-3  # what autocast would have given
    out.sum().backward()
    assert h16.grad.dtype == torch.bfloat16 and weight.grad.dtype == torch.float32


def test_compiled_equals_eager_and_recompiles_are_bounded():
    hidden, weight, labels, up = _inputs(B=3, T=41, C=48, V=97)
    eager = _value_and_grads(logprobs_chunked, hidden, weight, labels, up, chunk=64)
    stats = torch._dynamo.utils.counters["stats"]
    before = stats["unique_graphs"]
    comp = _value_and_grads(logprobs_chunked, hidden, weight, labels, up, chunk=64, compiled=True)
    for a, b in zip(comp, eager):
        assert torch.allclose(a, b, atol=1e-5, rtol=0)
    first = stats["unique_graphs"] - before
    assert first == 1  # exactly one graph: the in-place log_softmax kernel, which the backward reuses
    for T in (5, 17, 29, 50, 77, 130):  # B·T from 15 to 390 tokens: chunk lengths all over the place
        h, w, y, u = _inputs(B=3, T=T, C=48, V=97, seed=T)
        _value_and_grads(logprobs_chunked, h, w, y, u, chunk=64, compiled=True)
    with torch.no_grad():
        logprobs_chunked(h, w.detach(), y, chunk=100, compiled=True)
    assert stats["unique_graphs"] - before == first  # dynamic shapes: no recompiles for new lengths


def _tiny():
    return Transformer(ModelConfig(**PRESETS["tiny"])).init_weights(0).eval()


def _batch(seed=0, B=4, T=12):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 259, (B, T), generator=g)
    lengths = torch.tensor([12, 7, 9, 3])[:B]
    mask = (torch.arange(T)[None] < lengths[:, None]).long()  # right padding
    return ids, mask


def _expected(model, ids, mask, temperature=1.0):
    logits = model(ids, mask).float() / temperature
    lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]
    return torch.where((mask[:, 1:] * mask[:, :-1]).bool(), lp, 0.0)


def test_token_logprobs_equals_log_softmax_of_model_logits():
    model = _tiny()
    ids, mask = _batch()
    for temp in (1.0, 0.7):
        got = token_logprobs(model, ids, mask, temperature=temp, chunk=8)
        assert got.shape == (4, 11) and got.dtype == torch.float32
        assert torch.allclose(got, _expected(model, ids, mask, temp), atol=1e-5)
    assert (got[3, 2:] == 0).all() and (got[3, :2] != 0).all()  # row of length 3: 2 real targets


def test_token_logprobs_labels_mask_and_gradients():
    model = _tiny()
    ids, mask = _batch()
    labels_mask = mask.clone()
    labels_mask[:, :5] = 0  # the "prompt": no log-probs needed there
    got = token_logprobs(model, ids, mask, labels_mask)
    full = _expected(model, ids, mask)
    keep = (labels_mask[:, 1:] * mask[:, :-1]).bool()
    assert torch.allclose(got, torch.where(keep, full, 0.0), atol=1e-5)
    got.sum().backward()  # gradients reach the tied lm_head / embedding and the trunk
    assert model.lm_head.weight.grad.abs().sum() > 0
    assert model.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)
    none = token_logprobs(model, ids, mask, torch.zeros_like(mask))  # nothing selected: zeros, zero gradients
    none.sum().backward()
    assert (none == 0).all() and (model.lm_head.weight.grad == 0).all()


def test_token_logprobs_invariant_to_padding_and_batch_order():
    # "DPO masks" failure mode: log-probs must not change under extra padding or a reordered batch
    model = _tiny()
    ids, mask = _batch()
    base = token_logprobs(model, ids, mask)
    pad_ids = torch.cat([ids, torch.full((4, 5), 2)], 1)  # pad id == eos id, as in SmolLM2
    pad_mask = torch.cat([mask, torch.zeros(4, 5, dtype=torch.long)], 1)
    padded = token_logprobs(model, pad_ids, pad_mask)
    assert torch.allclose(padded[:, :11], base, atol=1e-5) and (padded[:, 11:] == 0).all()
    perm = torch.tensor([2, 0, 3, 1])
    assert torch.allclose(token_logprobs(model, ids[perm], mask[perm]), base[perm], atol=1e-5)
    # left padding (generation layout): same log-probs, shifted right by the pad length
    left_ids = torch.cat([torch.full((1, 3), 2), ids[1:2, :7]], 1)
    left_mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 7, dtype=torch.long)], 1)
    left = token_logprobs(model, left_ids, left_mask)
    assert torch.allclose(left[:, 3:], base[1:2, :6], atol=1e-5) and (left[:, :3] == 0).all()


def test_token_logprobs_packed_documents():
    # two documents packed in one row == each document on its own row
    model = _tiny()
    ids, _ = _batch()
    a, b = ids[0, :5], ids[1, :7]
    packed = torch.cat([a, b])[None]
    mask = segment_mask(torch.ones(1, 12, dtype=torch.long), torch.tensor([[1] * 5 + [2] * 7]))
    labels = torch.tensor([[1] * 5 + [0] + [1] * 6])  # the first token of document 2 is no target
    pos = torch.cat([torch.arange(5), torch.arange(7)])[None]
    got = token_logprobs(model, packed, mask, labels, position_ids=pos)
    sep_a = token_logprobs(model, a[None])
    sep_b = token_logprobs(model, b[None])
    assert torch.allclose(got[0, :4], sep_a[0], atol=1e-5) and torch.allclose(got[0, 5:], sep_b[0], atol=1e-5)
    assert got[0, 4] == 0  # the first token of document 2 is not predicted from document 1


def test_reward_head_runs_in_fp32_under_bf16_autocast():
    # --bf16 runs the trunk in bf16, but a bf16 score head would also round each reward to 8 significant bits
    # (steps of 1/128 near 1): answers that the fp32 head tells apart would tie, and a tie is never "correct"
    rm = _tiny()
    rm.add_score_head()
    ids, mask = torch.randint(3, 259, (256, 6), generator=torch.Generator().manual_seed(0)), torch.ones(256, 6)
    mask[::3, 4:] = 0  # some rows end early: the score is read at their last real token
    rows, last = torch.arange(256), last_token_index(mask)
    with torch.no_grad():
        with torch.autocast("cpu", torch.bfloat16):
            got = last_token_rewards(rm, ids, mask)
            h = rm(ids, mask, return_hidden=True)[rows, last]  # the bf16 trunk's hidden state, fp32 out of the norm
            bf16_head = rm.score(h).squeeze(-1).float()  # what autocast alone would give
        assert got.dtype == torch.float32 and torch.equal(got, rm.score(h).squeeze(-1))
        assert got.unique().numel() == 256 and bf16_head.unique().numel() < 250
        # an fp32 run is untouched: the plain head at the last real token
        plain = rm.score(rm(ids, mask, return_hidden=True)[rows, last]).squeeze(-1)
        assert torch.equal(last_token_rewards(rm, ids, mask), plain)
