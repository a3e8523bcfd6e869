"""A dataclass -> argparse bridge, one-line errors, and the progress logger every script shares."""
import argparse
import dataclasses
import json
import math
import os
import sys
import time


class UserError(Exception):
    """Bad input from the user: printed as one line `error: ...`, exit code 2, never a traceback."""


def _parse_bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's default prints usage; we keep to one line
        raise UserError(f"{self.prog}: {message}")


def build_parser(cls, prog=None) -> argparse.ArgumentParser:
    """Flags are the --kebab-case field names; the help text is the field's `doc` metadata."""
    p = _Parser(prog=prog or os.path.basename(sys.argv[0]), description=(cls.__doc__ or "").strip())
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else None
        if "list" in str(f.type):  # list[str] fields take one or more values: --compare a b c
            p.add_argument(flag, nargs="+", default=f.default_factory() if callable(f.default_factory) else [])
            continue
        kind = f.type if isinstance(f.type, type) else {"int": int, "float": float, "str": str, "bool": bool}.get(
            str(f.type), str)
        if kind is bool:
            p.add_argument(flag, type=_parse_bool, nargs="?", const=True, default=default)
        else:
            p.add_argument(flag, type=kind, default=default)
    return p


def parse_cli(cls, argv=None):
    args = build_parser(cls).parse_args(argv)
    cfg = cls(**vars(args))
    for f in dataclasses.fields(cls):  # NaN/inf are nonsense for every numeric flag we have
        v = getattr(cfg, f.name)
        if isinstance(v, float) and not math.isfinite(v):
            raise UserError(f"--{f.name.replace('_', '-')}: must be a finite number, got {v}")
    return cfg


def check(cond: bool, msg: str):
    """Raise a UserError with `msg` unless `cond` holds (for validating flags)."""
    if not cond:
        raise UserError(msg)


def run(main, cls, argv=None):
    """Entry point: parse flags, run main(cfg); bad input -> `error: ...` on stderr and exit 2."""
    try:
        cfg = parse_cli(cls, argv)
        return main(cfg)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)


class Logger:
    """One progress line per log interval on stdout, and the same data appended to OUT/log.jsonl."""

    def __init__(self, out_dir: str | None, total_steps: int, enabled: bool = True, start_step: int = 0):
        self.path = os.path.join(out_dir, "log.jsonl") if out_dir and enabled else None
        self.total, self.enabled = total_steps, enabled
        self.t0, self.start_step = time.time(), start_step
        if self.path:
            os.makedirs(out_dir, exist_ok=True)

    def log(self, step: int, **metrics):
        if not self.enabled:
            return
        elapsed = time.time() - self.t0
        done = max(step - self.start_step, 1)
        eta = elapsed / done * max(self.total - step, 0)
        row = {"step": step, **{k: (float(v) if hasattr(v, "item") else v) for k, v in metrics.items()}}
        row["elapsed_s"] = round(elapsed, 2)
        parts = [f"step {step}/{self.total}"]
        for k, v in row.items():
            if k in ("step", "elapsed_s"):
                continue
            parts.append(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}")
        parts.append(f"eta {eta:.0f}s")
        print(" | ".join(parts), flush=True)
        if self.path:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
