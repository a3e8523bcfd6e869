"""Speed-ups that change no result: each is one call, swapped in from outside the plain model, with a parity test.

- compile_pointwise(model): torch.compile'd RMSNorm, RoPE and SwiGLU (the scripts' --compile).
- sampling_copy(model): a bf16 copy of the policy for sampling (--bf16 in PPO and evaluate).
"""
from .generate import sampling_copy  # noqa: F401
from .model import compile_pointwise as _compile_pointwise


def compile_pointwise(model):
    _compile_pointwise()
    return model
