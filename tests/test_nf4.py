"""NF4 quantization: hand-worked packing, parity with the bitsandbytes functional API, NF4Linear autograd."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from nanoalign.fast import compile_pointwise
from nanoalign.model import PRESETS, ModelConfig, Transformer
from nanoalign.nf4 import (DYNAMIC_CODE, NF4_CODE, NF4Linear, NF4State, dequantize_absmax, dequantize_nf4,
                           dynamic_map_signed, quantize_nf4, quantize_nf4_)


def _bnb():
    return pytest.importorskip("bitsandbytes.functional")


def _weights(shape, seed=0):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 0.02
    w.view(-1)[:64] = 0.0  # an all-zero block (absmax 0) must not give NaN
    return w


def test_codebooks_equal_bitsandbytes():
    bnbf = _bnb()
    assert torch.equal(NF4_CODE, bnbf.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(dynamic_map_signed(), bnbf.create_dynamic_map(signed=True))
    # hand-worked: 127 positive codes + 1.0, 127 negative, one 0; extremes 10**-6 * 0.55 and 0.1 + 0.9 * 63.5/64
    assert DYNAMIC_CODE.unique().numel() == 256 and (DYNAMIC_CODE > 0).sum() == 128
    assert DYNAMIC_CODE[DYNAMIC_CODE > 0].min().item() == pytest.approx(0.55e-6)
    assert DYNAMIC_CODE[0].item() == pytest.approx(-(0.1 + 0.9 * 63.5 / 64))


def test_hand_worked_packing():
    w = torch.zeros(64)
    w[:6] = torch.tensor([2.0, -2.0, 0.0, 1.12, 1.0, 1.01])  # absmax 2 -> scaled 1, -1, 0, 0.56, 0.5, 0.505
    packed, state = quantize_nf4(w, double_quant=False)
    # 0.56 -> code 13 (0.5626); 0.5 sits below the 12/13 midpoint 0.5017 -> code 12 (0.4407); 0.505 -> 13
    assert packed[:3].tolist() == [(15 << 4) | 0, (7 << 4) | 13, (12 << 4) | 13]
    assert packed[3:].tolist() == [0x77] * 29  # zeros are code 7 in both nibbles
    assert state.absmax.tolist() == [2.0]
    assert dequantize_nf4(packed, state)[:4].tolist() == pytest.approx([2.0, -2.0, 0.0, 2 * 0.5626170039176941])


@pytest.mark.parametrize("shape", [(64, 128), (192, 576), (3, 4096)])
def test_bytes_absmax_and_dequant_equal_bitsandbytes(shape):
    bnbf = _bnb()
    w = _weights(shape)
    q, s = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)
    packed, state = quantize_nf4(w, blocksize=64, double_quant=False)
    assert torch.equal(packed, q.view(-1))
    assert torch.equal(state.absmax, s.absmax)
    assert torch.equal(dequantize_nf4(packed, state), bnbf.dequantize_4bit(q, s))


def test_double_quant_matches_bitsandbytes():
    bnbf = _bnb()
    w = _weights((576, 576))  # 5184 blocks -> 21 blocks of 256 absmaxes, the last one partial
    q, s = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    packed, state = quantize_nf4(w, blocksize=64, double_quant=True)
    assert torch.equal(packed, q.view(-1))
    assert torch.equal(state.absmax_offset, s.offset)
    assert torch.equal(state.absmax_scale, s.state2.absmax)
    # our 8-bit absmax codes are the nearest ones; bitsandbytes' C kernel (approximate binary search) may pick the
    # other neighbour when a value sits within a hair of a midpoint, so compare quality, not equality
    absmax = quantize_nf4(w, double_quant=False)[1].absmax
    x = (absmax - absmax.mean()) / s.state2.absmax.repeat_interleave(256)[: absmax.numel()]
    ours, theirs = DYNAMIC_CODE[state.absmax.long()], DYNAMIC_CODE[s.absmax.long()]
    assert ((x - ours).abs() <= (x - theirs).abs() + 1e-7).all()
    assert (state.absmax == s.absmax).float().mean() > 0.99
    # given the same codes, our dequantization is bitsandbytes' bit for bit
    same = NF4State(state.shape, state.dtype, 64, s.absmax, s.state2.absmax, s.offset)
    assert torch.equal(dequantize_nf4(packed, same), bnbf.dequantize_4bit(q, s))


def test_roundtrip_error_within_half_the_largest_code_gap():
    w = _weights((256, 128), seed=1) * torch.linspace(0.1, 10, 128)  # blocks with very different scales
    half_gap = (NF4_CODE[1:] - NF4_CODE[:-1]).max() / 2  # 0.1385, between 0.7230 and 1.0
    packed, state = quantize_nf4(w, double_quant=False)
    err = (dequantize_nf4(packed, state) - w).abs().view(-1, 64)
    assert (err <= state.absmax[:, None] * half_gap * (1 + 1e-6)).all()
    # with double quantization the absmax itself is approximate: |w - c*a'| <= a*gap/2 + |a - a'|
    packed, dq = quantize_nf4(w, double_quant=True)
    a_dq = dequantize_absmax(dq.absmax, dq.absmax_scale, dq.absmax_offset)
    err = (dequantize_nf4(packed, dq) - w).abs().view(-1, 64)
    assert (err <= (state.absmax * half_gap + (a_dq - state.absmax).abs())[:, None] * (1 + 1e-5)).all()
    assert err.mean() < 0.1 * state.absmax.mean()


def test_bits_per_param():
    def bits(packed, state):  # every tensor the dequantization needs, counted from the tensors themselves
        held = [packed] + [t for t in (state.absmax, state.absmax_scale, state.absmax_offset) if t is not None]
        return 8 * sum(t.numel() * t.element_size() for t in held) / state.shape.numel()
    w = _weights((64, 4096))  # 4096 blocks = 16 blocks of 256
    assert bits(*quantize_nf4(w, double_quant=False)) == 4.5  # 4 + 32/64
    # 4 + 8/64 + 32/(64*256), plus the one fp32 mean
    assert bits(*quantize_nf4(w, double_quant=True)) == pytest.approx(4 + 8 / 64 + 32 / 16384 + 32 / w.numel())


def test_numel_not_divisible_by_blocksize_raises():
    with pytest.raises(ValueError, match="divisible"):
        quantize_nf4(torch.randn(10, 10))


def test_nf4_linear_forward_backward_and_no_weight_grad():
    lin = nn.Linear(128, 64, bias=True)
    q = NF4Linear(lin)
    assert list(q.parameters()) == [q.bias] and not q.bias.requires_grad
    assert {k for k, _ in q.named_buffers()} == {"weight_packed", "absmax", "absmax_scale", "absmax_offset"}
    w = q.dequantize()
    assert w.shape == (64, 128) and (w - lin.weight).abs().max() < 0.2 * lin.weight.abs().max()
    x = torch.randn(2, 5, 128, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    y, y_ref = q(x), F.linear(x_ref, w, lin.bias.detach())
    assert torch.allclose(y, y_ref, atol=1e-6)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    assert torch.allclose(x.grad, x_ref.grad, atol=1e-6)
    assert q.bias.grad is None and all(b.grad is None for b in q.buffers())


@pytest.mark.parametrize("mode", ["eager", "compiled-dequant", "compiled-module"])
def test_backward_saves_packed_bytes_not_a_dequantized_weight(mode):
    q = NF4Linear(nn.Linear(256, 128, bias=False))
    if mode == "compiled-dequant":
        compile_pointwise(q)
    if mode == "compiled-module":  # inside a compiled model, NF4 layers graph-break (see NF4Linear.forward)
        q = torch.compile(q)
    saved = []

    def pack(t):
        saved.append((t.dtype, tuple(t.shape)))
        return t

    x = torch.randn(4, 256, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        q(x).sum().backward()
    assert (torch.uint8, (256 * 128 // 2,)) in saved
    assert all(shape not in ((128, 256), (256, 128)) for _, shape in saved)  # no (out, in) weight kept
    assert x.grad is not None


def test_compiled_matches_eager():
    lin = nn.Linear(128, 64, bias=False)
    eager, compiled = NF4Linear(lin), compile_pointwise(NF4Linear(lin))
    x = torch.randn(3, 128, requires_grad=True)
    xc = x.detach().clone().requires_grad_(True)
    y, yc = eager(x), compiled(xc)
    assert torch.allclose(y, yc, atol=1e-5)
    y.sum().backward()
    yc.sum().backward()
    assert torch.allclose(x.grad, xc.grad, atol=1e-5)


def test_quantize_model_in_place():
    m = Transformer(ModelConfig(**PRESETS["tiny"])).init_weights(0)
    ids = torch.randint(0, 259, (2, 12), generator=torch.Generator().manual_seed(0))
    ref = m(ids)
    fp32_bytes = sum(b.numel() * b.element_size() for b in m.state_dict().values())
    assert quantize_nf4_(m) is m
    assert sum(isinstance(x, NF4Linear) for x in m.modules()) == 2 * 7  # 7 per layer; lm_head (tied) skipped
    assert isinstance(m.model.layers[0].mlp.down_proj, NF4Linear) and isinstance(m.lm_head, nn.Linear)
    assert m.lm_head.weight is m.model.embed_tokens.weight
    assert not any(isinstance(x, nn.Linear) for x in m.model.layers.modules())
    nf4_bytes = sum(b.numel() * b.element_size() for b in m.state_dict().values())
    assert nf4_bytes < 0.75 * fp32_bytes  # the tied fp32 embedding (259 x 64) stays: it is half the tiny model
    out = m(ids)
    rel = (out - ref).norm() / ref.norm()
    assert 0.01 < rel < 0.2  # close to the fp model (NF4 error ~ 10% of each weight), but not equal
