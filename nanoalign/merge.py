"""Model merging. You don't need a GPU to merge models: it's a for loop over tensors. Simplifications: no per-layer
weights, no TIES/DARE sparsification; the tokenizer is the first model's (the base's).

    linear           θ = Σ w_i θ_i / Σ w_i                      (model soups, Wortsman et al. 2022)
    slerp            θ = sin((1−t)Ω)/sin Ω · θ_a + sin(tΩ)/sin Ω · θ_b, cos Ω = θ̂_a·θ̂_b, per tensor (Shoemake 1985)
    task-arithmetic  θ = θ_base + Σ w_i (θ_i − θ_base)            (task vectors, Ilharco et al. 2023)
"""
import os
from dataclasses import dataclass, field

import torch

from .checkpoint import save_checkpoint
from .cli import UserError, check, run
from .hub import load


def merge_linear(states: list[dict], weights: list[float]) -> dict:
    return {k: (sum(w * s[k].double() for s, w in zip(states, weights)) / sum(weights)).to(states[0][k].dtype)
            for k in states[0]}


def slerp(a: torch.Tensor, b: torch.Tensor, t: float, eps: float = 1e-6) -> torch.Tensor:
    """Spherical interpolation of one tensor, flattened to a vector; linear when a and b are (near-)parallel."""
    a64, b64 = a.double(), b.double()
    cos = (a64.flatten() @ b64.flatten()) / (a64.norm() * b64.norm())  # NaN when either is all zeros
    if not cos.abs() <= 1 - eps:  # sin Ω ≈ 0 (or a zero tensor): the formula is 0/0, and lerp is the limit anyway
        return ((1 - t) * a64 + t * b64).to(a.dtype)
    omega = torch.arccos(cos)
    out = torch.sin((1 - t) * omega) / torch.sin(omega) * a64 + torch.sin(t * omega) / torch.sin(omega) * b64
    return out.to(a.dtype)


def merge_task_arithmetic(base: dict, states: list[dict], weights: list[float]) -> dict:
    return {k: (base[k].double() + sum(w * (s[k].double() - base[k].double()) for s, w in zip(states, weights)))
            .to(base[k].dtype) for k in base}


@dataclass
class Config:
    """Merge checkpoints of one architecture into --out."""
    models: list[str] = field(default_factory=list)  # models to merge (anything --init accepts)
    weights: list[float] = field(default_factory=list)  # one weight per model (default: equal); slerp: one t in [0, 1]
    method: str = "linear"  # how to merge: {linear, slerp, task-arithmetic}
    base: str = ""  # the base model of task arithmetic
    out: str = ""  # output checkpoint directory


def main(cfg: Config):
    n, slerp_ = len(cfg.models), cfg.method == "slerp"
    check(n > 0 and cfg.out != "", "--models and --out are required")
    try:
        ws = [float(w) for w in cfg.weights] or ([0.5] if slerp_ else [1.0 / n] * n)
    except ValueError:
        raise UserError(f"--weights: not a number among {' '.join(map(str, cfg.weights))}")
    check(all(abs(w) < float("inf") for w in ws), "--weights must be finite numbers")  # NaN fails it too
    check(not slerp_ or (n == 2 and len(ws) == 1 and 0 <= ws[0] <= 1), "slerp needs 2 --models and one t in [0, 1]")
    check(slerp_ or len(ws) == n, f"--weights: got {len(ws)} for {n} models")
    check(cfg.method != "linear" or sum(ws) != 0, "--weights must not sum to 0 for a linear merge")
    check((cfg.method == "task-arithmetic") == bool(cfg.base), "task-arithmetic needs --base, and only it takes one")
    check(not os.path.exists(cfg.out) or os.path.isdir(cfg.out), f"{cfg.out}: exists and is not a directory")
    paths = ([cfg.base] if cfg.base else []) + cfg.models
    model, tok = load(paths[0])
    states = [model.state_dict()] + [load(p)[0].state_dict() for p in paths[1:]]
    shapes = [{k: v.shape for k, v in sd.items()} for sd in states]
    check(all(s == shapes[0] for s in shapes), f"the architecture differs among {' '.join(paths)}")
    model.load_state_dict({"linear": lambda: merge_linear(states, ws),
                           "slerp": lambda: {k: slerp(states[0][k], states[1][k], ws[0]) for k in states[0]},
                           "task-arithmetic": lambda: merge_task_arithmetic(states[0], states[1:], ws)}[cfg.method]())
    save_checkpoint(cfg.out, model, tok)
    print(f"merged {n} models ({cfg.method}) into {cfg.out}")


if __name__ == "__main__":
    run(main, Config)
