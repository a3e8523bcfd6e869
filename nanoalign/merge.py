"""Model merging. You don't need a GPU to merge models: it's a for loop over tensors.

    linear           θ = Σ w_i θ_i / Σ w_i                      (model soups, Wortsman et al. 2022)
    slerp            θ = sin((1−t)Ω)/sin Ω · θ_a + sin(tΩ)/sin Ω · θ_b, cos Ω = θ̂_a·θ̂_b, per tensor (Shoemake 1985)
    task-arithmetic  θ = θ_base + Σ w_i (θ_i − θ_base)            (task vectors, Ilharco et al. 2023)

    python -m nanoalign.merge --models A B --weights 0.5 0.5 --method linear --out merged/
    python -m nanoalign.merge --models A B --weights 0.3 --method slerp --out merged/        (t: 0 = A, 1 = B)
    python -m nanoalign.merge --models A B --weights 1 0.5 --method task-arithmetic --base SFT --out merged/

Simplifications: no per-layer weights, no TIES/DARE sparsification; the tokenizer is the first model's (the base's).
"""
import os
from dataclasses import dataclass, field

import torch

from .checkpoint import save_checkpoint
from .cli import UserError, check, run
from .hub import load


def merge_linear(states: list[dict], weights: list[float]) -> dict:
    """Weighted average of state dicts; the weights are normalised to sum to 1."""
    total = sum(weights)
    return {k: sum(w * s[k].double() for s, w in zip(states, weights)).div(total).to(states[0][k].dtype)
            for k in states[0]}


def slerp(a: torch.Tensor, b: torch.Tensor, t: float, eps: float = 1e-6) -> torch.Tensor:
    """Spherical interpolation of one tensor, flattened to a vector; linear when a and b are (near-)parallel."""
    a64, b64 = a.double(), b.double()
    na, nb = a64.norm(), b64.norm()
    cos = (a64.flatten() @ b64.flatten()) / (na * nb) if na > 0 and nb > 0 else torch.tensor(1.0)
    if cos.abs() > 1 - eps:  # sin Ω ≈ 0: the formula is 0/0, and lerp is the limit anyway
        return ((1 - t) * a64 + t * b64).to(a.dtype)
    omega = torch.arccos(cos.clamp(-1, 1))
    out = torch.sin((1 - t) * omega) / torch.sin(omega) * a64 + torch.sin(t * omega) / torch.sin(omega) * b64
    return out.to(a.dtype)


def merge_task_arithmetic(base: dict, states: list[dict], weights: list[float]) -> dict:
    """Add each model's task vector (θ_i − θ_base), scaled by its weight, to the base."""
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


def main(cfg: Config) -> str:
    n, slerp_ = len(cfg.models), cfg.method == "slerp"
    check(n > 0 and cfg.out != "", "--models and --out are required")
    try:
        ws = [float(w) for w in cfg.weights] or ([0.5] if slerp_ else [1.0 / n] * n)
    except ValueError:
        raise UserError(f"--weights: not a number among {' '.join(map(str, cfg.weights))}")
    check(all(abs(w) < float("inf") for w in ws), "--weights must be finite numbers")  # NaN fails it too
    check(not slerp_ or (n == 2 and len(ws) == 1 and 0 <= ws[0] <= 1), f"slerp needs exactly 2 --models and one "
          f"--weights t in [0, 1], got {n} models and --weights {' '.join(map(str, ws))}")
    check(slerp_ or len(ws) == n, f"--weights: got {len(ws)} for {n} models")
    check(cfg.method != "linear" or sum(ws) != 0, "--weights must not sum to 0 for a linear merge")
    check((cfg.method == "task-arithmetic") == bool(cfg.base), "task-arithmetic needs --base, and only it takes one")
    check(not os.path.exists(cfg.out) or os.path.isdir(cfg.out), f"{cfg.out}: exists and is not a directory")
    paths = ([cfg.base] if cfg.base else []) + cfg.models
    models = [load(p) for p in paths]
    states = [m.state_dict() for m, _ in models]
    for p, sd in zip(paths[1:], states[1:]):
        bad = sorted(set(states[0]) ^ set(sd)) or [k for k in sd if sd[k].shape != states[0][k].shape]
        check(not bad, f"{p}: architecture differs from {paths[0]} (e.g. {bad and bad[0]})")
    model, tok = models[0]
    model.load_state_dict({"linear": lambda: merge_linear(states, ws),
                           "slerp": lambda: {k: slerp(states[0][k], states[1][k], ws[0]) for k in states[0]},
                           "task-arithmetic": lambda: merge_task_arithmetic(states[0], states[1:], ws)}[cfg.method]())
    save_checkpoint(cfg.out, model, tok)
    print(f"merged {n} models ({cfg.method}) into {cfg.out}")
    return cfg.out


if __name__ == "__main__":
    run(main, Config)
