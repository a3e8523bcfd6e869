"""Model merging. You don't need a GPU to merge models: it's a for loop over tensors.

    linear           θ = Σ w_i θ_i / Σ w_i                      (model soups, Wortsman et al. 2022)
    slerp            θ = sin((1−t)Ω)/sin Ω · θ_a + sin(tΩ)/sin Ω · θ_b, cos Ω = θ̂_a·θ̂_b, per tensor (Shoemake 1985)
    task-arithmetic  θ = θ_base + Σ w_i (θ_i − θ_base)            (task vectors, Ilharco et al. 2023)

    python -m nanoalign.merge --models A B --weights 0.5 0.5 --method linear --out merged/
    python -m nanoalign.merge --models A B --weights 0.3 --method slerp --out merged/        (t: 0 = A, 1 = B)
    python -m nanoalign.merge --models A B --weights 1 0.5 --method task-arithmetic --base SFT --out merged/

Models are anything --init accepts; they must share an architecture. The tokenizer is taken from the first model
(the base for task arithmetic). Simplifications: no per-layer weights, no TIES/DARE sparsification.
"""
import os
import sys

import torch

from .checkpoint import save_checkpoint
from .cli import UserError, _Parser, check
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


def merge_slerp(a: dict, b: dict, t: float) -> dict:
    return {k: slerp(a[k], b[k], t) for k in a}


def merge_task_arithmetic(base: dict, states: list[dict], weights: list[float]) -> dict:
    """Add each model's task vector (θ_i − θ_base), scaled by its weight, to the base."""
    return {k: (base[k].double() + sum(w * (s[k].double() - base[k].double()) for s, w in zip(states, weights)))
            .to(base[k].dtype) for k in base}


def _load_all(paths: list[str]):
    models = [load(p) for p in paths]
    ref = models[0][0].state_dict()
    for p, (m, _) in zip(paths[1:], models[1:]):
        sd = m.state_dict()
        bad = sorted(set(ref) ^ set(sd)) or [k for k in ref if sd[k].shape != ref[k].shape]
        if bad:
            raise UserError(f"{p}: architecture differs from {paths[0]} (e.g. {bad[0]})")
    return models


def main(argv=None) -> str:
    p = _Parser(prog="nanoalign.merge", description="Merge checkpoints.")  # its errors are UserErrors: exit 2
    p.add_argument("--models", nargs="+", required=True, help="models to merge (anything --init accepts)")
    p.add_argument("--weights", nargs="+", type=float, help="one weight per model; slerp: one t in [0, 1]")
    p.add_argument("--method", choices=("linear", "slerp", "task-arithmetic"), default="linear")
    p.add_argument("--base", default="", help="the base model of task arithmetic")
    p.add_argument("--out", required=True, help="output checkpoint directory")
    a = p.parse_args(argv)
    n = len(a.models)
    weights = a.weights if a.weights is not None else ([0.5] if a.method == "slerp" else [1.0 / n] * n)
    check(all(abs(w) < float("inf") for w in weights), "--weights must be finite numbers")
    if a.method == "slerp":
        check(n == 2 and len(weights) == 1, "slerp needs exactly 2 --models and one --weights t")
        check(0 <= weights[0] <= 1, f"slerp t must be in [0, 1], got {weights[0]}")
    else:
        check(len(weights) == n, f"--weights: got {len(weights)} for {n} models")
    check(a.method != "linear" or sum(weights) != 0, "--weights must not sum to 0 for a linear merge")
    check(a.method == "task-arithmetic" or not a.base, "--base is only used by task-arithmetic")
    check(a.method != "task-arithmetic" or bool(a.base), "task-arithmetic needs --base")
    check(not os.path.exists(a.out) or os.path.isdir(a.out), f"{a.out}: exists and is not a directory")
    models = _load_all(([a.base] if a.base else []) + a.models)
    states = [m.state_dict() for m, _ in models]
    if a.method == "linear":
        merged = merge_linear(states, weights)
    elif a.method == "slerp":
        merged = merge_slerp(states[0], states[1], weights[0])
    else:
        merged = merge_task_arithmetic(states[0], states[1:], weights)
    model, tok = models[0]
    model.load_state_dict(merged)
    save_checkpoint(a.out, model, tok)
    print(f"merged {n} models ({a.method}) into {a.out}")
    return a.out


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
