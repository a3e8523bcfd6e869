"""4-bit NormalFloat (NF4) weights with double quantization, as in QLoRA (Dettmers et al. 2023, sec. 3).

A weight matrix is cut into blocks of 64 values. Each block is scaled by its absmax into [-1, 1] and every value
is replaced by the index of the nearest of 16 NF4 codes (quantiles of N(0, 1), so Gaussian weights use all codes
about equally). Two 4-bit indices are packed per byte, first element in the high nibble. Double quantization then
stores the 32-bit absmaxes themselves in 8 bits: subtract their mean, quantize them in blocks of 256 with the
signed 8-bit dynamic map, and keep one fp32 scale per 256 blocks. Storage: 4 + 32/64 = 4.5 bits/param, or
4 + 8/64 + 32/(64*256) ~ 4.127 bits/param with double quantization.

Bit for bit equal to bitsandbytes' `quantize_4bit(..., quant_type="nf4")` (the tests' oracle): the packed codes,
the fp32 absmaxes, and under double quantization their offset (the mean), the fp32 scale of each 256-block, and the
dequantized weight given the same 8-bit absmax codes. Those codes themselves can differ: we take the nearest one,
bitsandbytes' kernel sometimes the other neighbour of a near-midpoint absmax (~0.2% of blocks; the test wants 99%).

`NF4Linear` keeps only the packed bytes; forward dequantizes on the fly and backward re-dequantizes, so a
full-precision copy of the weight never outlives one matmul (the QLoRA memory saving). `quantize_nf4_` swaps
every nn.Linear of a model for an NF4Linear; `nanoalign.lora.apply_lora` on top of that is QLoRA.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

# The 16 NF4 codes, index order 0..15 (bitsandbytes get_4bit_type("nf4"); QLoRA appendix E).
NF4_CODE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0])

# Byte b = (hi << 4) | lo decodes to (NF4_CODE[hi], NF4_CODE[lo]): a (256, 2) table, high nibble first.
NF4_PAIRS = torch.stack((NF4_CODE.repeat_interleave(16), NF4_CODE.repeat(16)), dim=-1)


def dynamic_map_signed() -> torch.Tensor:
    """The signed 8-bit dynamic quantization map (Dettmers 2015, "8-Bit Approximations", sec. 3), 256 sorted values:
    sign * 10**-e * fraction for e = 6..0, exponent e with 2**(6-e) fractions (the midpoints of an even split of
    [0.1, 1]), plus 0 and 1.0. Dense near 0, which suits the centred absmaxes it quantizes. Computed in fp32, like
    bitsandbytes' create_dynamic_map, so the two maps are equal bit for bit."""
    values = [0.0, 1.0]
    for i in range(7):  # i = 6 - e: 2**i fractions at scale 10**(i - 6)
        edges = torch.linspace(0.1, 1.0, 2 ** i + 1, dtype=torch.float32)
        codes = 10.0 ** (i - 6) * ((edges[:-1] + edges[1:]) / 2)  # fp32 arithmetic throughout
        values += codes.tolist() + (-codes).tolist()
    return torch.tensor(sorted(values), dtype=torch.float32)


DYNAMIC_CODE = dynamic_map_signed()


def _blockwise_absmax_codes(x: torch.Tensor, code: torch.Tensor, blocksize: int):
    """x (n,) fp32, n % blocksize == 0 -> (codes (n,) uint8, absmax (n // blocksize,) fp32): each value scaled by
    its block's absmax into [-1, 1], then the index of the nearest code."""
    blocks = x.view(-1, blocksize)  # (n_blocks, blocksize)
    absmax = blocks.abs().amax(dim=1)
    # multiply by the reciprocal (not divide), exactly as bitsandbytes does, so boundary cases round the same way
    scaled = (blocks * (1.0 / absmax.clamp(min=1e-38))[:, None]).clamp(-1, 1)
    midpoints = (code[:-1] + code[1:]) / 2  # the nearest code is the bucket among the midpoints (ties go down)
    return torch.bucketize(scaled.view(-1), midpoints.to(x.device)).to(torch.uint8), absmax


@dataclass
class NF4State:
    """Everything besides the packed bytes that dequantization needs."""
    shape: torch.Size  # original weight shape, e.g. (out_features, in_features)
    dtype: torch.dtype  # original weight dtype (dequantize returns this by default)
    blocksize: int  # values per absmax block (64)
    absmax: torch.Tensor  # (n_blocks,) fp32 block absmaxes; uint8 dynamic-map codes under double quantization
    absmax_scale: torch.Tensor | None = None  # (ceil(n_blocks / 256),) fp32 scale of each 256-block of absmaxes
    absmax_offset: torch.Tensor | None = None  # () fp32 mean of the absmaxes, subtracted before quantizing them


def quantize_nf4(w: torch.Tensor, blocksize: int = 64, double_quant: bool = True):
    """w (any shape, numel % blocksize == 0) -> (packed (numel/2,) uint8, NF4State)."""
    if w.numel() % blocksize:
        raise ValueError(f"NF4 needs numel divisible by the blocksize {blocksize}: {tuple(w.shape)} is not")
    codes, absmax = _blockwise_absmax_codes(w.detach().reshape(-1).float(), NF4_CODE, blocksize)
    packed = (codes[0::2] << 4) | codes[1::2]  # two codes per byte, first element in the high nibble
    state = NF4State(w.shape, w.dtype, blocksize, absmax)
    if double_quant:
        # QLoRA sec. 3 "Double Quantization": absmax > 0, so centre it to use the signed map's full range
        offset, n = absmax.mean(), absmax.numel()
        padded = F.pad(absmax - offset, (0, -n % 256))  # zeros do not change a block's absmax
        q_absmax, scale = _blockwise_absmax_codes(padded, DYNAMIC_CODE, 256)
        state.absmax, state.absmax_scale, state.absmax_offset = q_absmax[:n], scale, offset
    return packed, state


def dequantize_absmax(absmax, absmax_scale=None, absmax_offset=None) -> torch.Tensor:
    """The fp32 block absmaxes; under double quantization code[q] * (scale of its 256-block) + mean."""
    if absmax_scale is None:
        return absmax
    n = absmax.numel()
    a = DYNAMIC_CODE.to(absmax.device)[absmax.long()]
    a = F.pad(a, (0, -n % 256)).view(-1, 256) * absmax_scale[:, None]  # (ceil(n/256), 256)
    return a.view(-1)[:n] + absmax_offset


def dequantize_blocks(packed, absmax, absmax_scale=None, absmax_offset=None) -> torch.Tensor:
    """The fp32 weight as (n_blocks, blocksize): plain torch ops, which torch.compile fuses into one kernel."""
    absmax = dequantize_absmax(absmax, absmax_scale, absmax_offset)
    pairs = NF4_PAIRS.to(packed.device)[packed.long()]  # (numel/2, 2): one lookup decodes both nibbles of a byte
    return pairs.view(len(absmax), -1) * absmax[:, None]


def dequantize_nf4(packed: torch.Tensor, state: NF4State, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Inverse of quantize_nf4, up to the rounding: returns a tensor of state.shape in `dtype` (default: original)."""
    w = dequantize_blocks(packed, state.absmax, state.absmax_scale, state.absmax_offset)
    return w.view(state.shape).to(dtype or state.dtype)


class _NF4Matmul(torch.autograd.Function):
    """y = x @ W.T with W dequantized on the fly. Saves the packed bytes, never the dequantized W
    (torchao LinearNF4 does the same): backward re-dequantizes for grad_x = grad_y @ W. W itself gets no grad."""

    @staticmethod
    def forward(ctx, x, dequantize, shape, *quantized):  # quantized: packed bytes, absmax, absmax scale and offset
        ctx.save_for_backward(*quantized)
        ctx.dequantize, ctx.w_shape = dequantize, shape
        return x @ dequantize(*quantized).view(shape).to(x.dtype).t()  # (..., out)

    @staticmethod
    def backward(ctx, grad_y):
        w = ctx.dequantize(*ctx.saved_tensors).view(ctx.w_shape).to(grad_y.dtype)  # (out, in)
        return grad_y @ w, None, None, *[None] * len(ctx.saved_tensors)  # (..., in)


class NF4Linear(nn.Module):
    """A frozen linear layer stored in NF4: buffers only (packed bytes + quant state), no fp weight."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        packed, state = quantize_nf4(linear.weight.data)
        self.shape, self.dtype, self.blocksize = state.shape, state.dtype, state.blocksize
        self.dequantize_blocks = dequantize_blocks  # nanoalign.fast.compile_pointwise swaps in a compiled one
        self.register_buffer("weight_packed", packed)
        for name in ("absmax", "absmax_scale", "absmax_offset"):
            self.register_buffer(name, getattr(state, name))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    @property
    def state(self) -> NF4State:
        return NF4State(self.shape, self.dtype, self.blocksize, self.absmax, self.absmax_scale, self.absmax_offset)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The full-precision weight (out, in): for merging LoRA and for tests, not for the forward pass."""
        return dequantize_nf4(self.weight_packed, self.state, dtype)

    # Kept out of any enclosing torch.compile graph: traced whole, AOTAutograd merges the two dequantizations and
    # saves the full-precision W for backward, the very copy QLoRA must not keep. fast.compile_pointwise compiles
    # just the dequantization instead, into one fused kernel (the matmul is a BLAS call either way).
    @torch.compiler.disable
    def forward(self, x):
        y = _NF4Matmul.apply(x, self.dequantize_blocks, self.shape, self.weight_packed, self.absmax, self.absmax_scale,
                             self.absmax_offset)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, blocksize={self.blocksize}"


def quantize_nf4_(model: nn.Module, skip=("lm_head", "score", "lora_A", "lora_B")):
    """Swap every nn.Linear in `model` for an NF4Linear, in place (gpt-fast style module swap); returns `model`.
    skip: child names left in full precision: the lm_head (tied to the embedding in SmolLM2), an RM's score head and
    LoRA adapters, so this also works after apply_lora (it quantizes each `.base`)."""
    for name, child in model.named_children():
        if isinstance(child, nn.Linear) and name not in skip:
            setattr(model, name, NF4Linear(child))
        elif name not in skip:
            quantize_nf4_(child, skip)
    return model
