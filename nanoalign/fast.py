"""Speed-ups that change no result, each one call that swaps modules of a plain model from outside (as gpt-fast's
quantize.py does), so model.py stays a plain Llama; each has a parity test against the plain path (tests/test_fast.py).

- compile_pointwise(model): the scripts' --compile. RMSNorm, SwiGLU and NF4 dequantization become torch.compile'd
  kernels, one fused loop each whose backward saves only its inputs (eager autograd keeps every intermediate).
  Matmuls and attention stay eager, so compiling takes seconds, not the minutes a whole training step would.
- sampling_copy(model): a frozen bf16 copy of the policy to sample from (PPO's and evaluate's --bf16). Decoding reads
  every weight once per token, so on a CPU it is bound by memory traffic and per-op overhead: bf16 halves the
  traffic; packing the weights for oneDNN saves a reorder in every matmul, and stacking q/k/v two matmuls per layer.
"""
import copy
import functools

import torch
import torch.nn as nn

from .lora import merge_lora
from .model import MLP, Attention, RMSNorm, rms_norm, swiglu
from .nf4 import NF4Linear, dequantize_blocks

@functools.cache  # one per process, shared by every layer and call
def compiled(fn, decode: bool = False):
    """fn torch.compile'd, with dynamic shapes so that new lengths reuse it. decode: generate's one-token step, static
    shapes; inductor fuses each layer's ~20 small kernels (norms, RoPE, cache writes, SwiGLU), called from C++."""
    return torch.compile(fn, dynamic=not decode, options={"cpp_wrapper": True} if decode else None)


class CompiledRMSNorm(RMSNorm):
    def forward(self, x):
        return compiled(rms_norm)(x, self.weight, self.eps)


class CompiledMLP(MLP):
    def forward(self, x):
        return self.down_proj(compiled(swiglu)(self.gate_proj(x), self.up_proj(x)))


def compile_pointwise(model):
    """Swap in the compiled RMSNorm and SwiGLU, and compile every NF4 dequantization, in place. Reassigning a
    module's class keeps its parameters and state-dict keys; only `forward` changes."""
    swaps = {RMSNorm: CompiledRMSNorm, MLP: CompiledMLP}
    for m in model.modules():
        if type(m) in swaps:
            m.__class__ = swaps[type(m)]
        elif isinstance(m, NF4Linear):
            m.dequantize_blocks = compiled(dequantize_blocks)
    return model


@torch.library.custom_op("nanoalign::packed_linear", mutates_args=())
def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, out_features: int) -> torch.Tensor:
    """x @ W.T + b for a W packed by oneDNN: one opaque call to torch.compile, with the packed weight as an input, so
    a new sampling copy (PPO makes one per iteration) runs the decode step already compiled."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


@packed_linear.register_fake
def _(x, packed, bias, out_features):
    return x.new_empty(*x.shape[:-1], out_features)


class PackedLinear(nn.Module):
    """A frozen Linear whose weight oneDNN reorders once into its blocked layout (what inductor's freezing pass does
    for CPU inference), instead of in every call."""

    def __init__(self, linear: nn.Linear, batch_hint: int = 8):
        super().__init__()
        self.out_features, self.bias = linear.weight.shape[0], linear.bias
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), batch_hint)  # opaque

    def forward(self, x):
        if torch.compiler.is_compiling():
            return packed_linear(x, self.packed, self.bias, self.out_features)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")  # eager: no op toll


class FusedQKVAttention(Attention):
    """Attention with q, k and v from one matmul over their stacked weights."""

    def qkv(self, x):  # the widths of q, k and v: H·D, Hkv·D, Hkv·D
        q, kv = self.n_heads * self.head_dim, self.n_kv * self.head_dim
        return self.qkv_proj(x).split([q, kv, kv], dim=-1)


@torch.no_grad()
def sampling_copy(model, dtype=torch.bfloat16, pack: bool = True):
    """A frozen copy to sample from: LoRA merged, cast to `dtype`, q/k/v stacked where plain (not NF4), and with pack
    (on a CPU with oneDNN) every nn.Linear packed. Samples come from this rounding; log-probs from the policy."""
    copied = merge_lora(copy.deepcopy(model)).to(dtype).eval().requires_grad_(False)
    for m in copied.modules():
        projs = [m.q_proj, m.k_proj, m.v_proj] if type(m) is Attention else []
        if projs and all(type(p) is nn.Linear for p in projs):
            w = torch.cat([p.weight for p in projs])  # (out_q + out_k + out_v, in)
            m.qkv_proj = fused = nn.Linear(w.shape[1], w.shape[0], projs[0].bias is not None, device="meta")  # no init
            fused.weight = nn.Parameter(w, requires_grad=False)
            if fused.bias is not None:
                fused.bias = nn.Parameter(torch.cat([p.bias for p in projs]), requires_grad=False)
            del m.q_proj, m.k_proj, m.v_proj
            m.__class__ = FusedQKVAttention
    if pack and next(copied.parameters()).device.type == "cpu" and torch.backends.mkldnn.is_available():
        for m in list(copied.modules()):
            for name, child in m.named_children():
                if type(child) is nn.Linear:
                    setattr(m, name, PackedLinear(child))
    return copied
