"""Flags from a dataclass (each field's same-line `# comment` is its --help), one-line errors, and the progress log."""
import argparse
import contextlib
import dataclasses
import inspect
import json
import math
import os
import re
import sys
import time

CHOICES = re.compile(r"\{(\w[\w.-]*(?:, \w[\w.-]*)+)\}")  # "{a, b, c}" in a str field's comment: its only values
FIELD = re.compile(r"\s*(\w+)\s*:(?:[^#'\"]|'[^']*'|\"[^\"]*\")*#\s*(.*)")  # name: type = default  # comment


class UserError(Exception):
    """Bad input from the user: printed as one line `error: ...`, exit code 2, never a traceback."""


def check(cond: bool, msg: str):
    if not cond:
        raise UserError(msg)


def check_ranges(cfg, positive=(), non_negative=()):
    for name in (*positive, *non_negative):
        v, op = getattr(cfg, name), ">" if name in positive else ">="
        check(v > 0 if op == ">" else v >= 0, f"--{name.replace('_', '-')} must be {op} 0, got {v}")


def _parse_bool(s: str) -> bool:
    if s.lower() not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
        raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")
    return s.lower() in ("1", "true", "yes", "on")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's default prints usage; we keep to one line
        raise UserError(f"{self.prog}: {message}")


class _Help(argparse.HelpFormatter):
    def _format_args(self, action, default_metavar):  # a boolean reads `--nf4`, not `--nf4 [NF4]`
        return "" if action.type is _parse_bool else super()._format_args(action, default_metavar)


def build_parser(cls, prog=None) -> argparse.ArgumentParser:
    """Flags are the --kebab-case field names. --help shows each field's comment, its default and its choices: a
    str field whose comment holds `{a, b, c}` takes only those values. A bool field is a flag: --x, or --x false."""
    script = os.path.abspath(sys.argv[0])  # a tool of this package runs as `python -m nanoalign.X`
    default = (f"python -m nanoalign.{os.path.basename(script)[:-3]}" if os.path.dirname(script) ==
               os.path.dirname(os.path.abspath(__file__)) else os.path.basename(script))
    p = _Parser(prog=prog or default, description=cls.__doc__.strip(), formatter_class=_Help)
    comments = {}  # {name: comment} for each `name: type = default  # comment` line, a subclass's winning
    for c in reversed(cls.__mro__[:-1]):
        try:
            comments.update({m[1]: m[2] for m in map(FIELD.match, inspect.getsource(c).splitlines()) if m})
        except (OSError, TypeError):  # no source to read (e.g. a class made at runtime): no help text
            pass
    own = list(vars(cls).get("__annotations__", {}))  # the class's own fields first, then those it inherits
    for f in sorted(dataclasses.fields(cls), key=lambda f: own.index(f.name) if f.name in own else len(own)):
        flag, comment = "--" + f.name.replace("_", "-"), comments.get(f.name, "")
        default = f.default_factory() if callable(f.default_factory) else f.default
        kind = f.type if isinstance(f.type, type) else {"int": int, "float": float, "bool": bool}.get(str(f.type), str)
        shown = ("on; " + flag + " false turns it off" if default else "off") if kind is bool else default
        kw = {"help": (comment + (f" (default: {shown})" if shown not in ("", None, []) else "")).replace("%", "%%"),
              "default": None if default is dataclasses.MISSING else default}
        if "list" in str(f.type):  # list[str] fields take one or more values: --compare a b c
            p.add_argument(flag, nargs="+", **kw)
        elif kind is bool:
            p.add_argument(flag, type=_parse_bool, nargs="?", const=True, **kw)
        else:
            m = CHOICES.search(comment) if kind is str else None
            p.add_argument(flag, type=kind, choices=m and m.group(1).split(", "), **kw)
    return p


def parse_cli(cls, argv=None, prog=None):
    cfg = cls(**vars(build_parser(cls, prog).parse_args(argv)))
    for name, v in vars(cfg).items():  # NaN/inf are nonsense for every numeric flag we have
        check(not isinstance(v, float) or math.isfinite(v), f"--{name.replace('_', '-')}: must be a finite number, "
              f"got {v}")
    return cfg


def run(main, cls, argv=None, prog=None):  # the entry point of every command
    with one_line_errors():
        return main(parse_cli(cls, argv, prog))


@contextlib.contextmanager
def one_line_errors():  # a UserError is `error: ...` and exit code 2; Ctrl-C exit code 130; never a traceback
    try:
        yield
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)


class Logger:
    """A progress line on stdout (the fields in `show`, or all) and a JSON row of OUT/log.jsonl per call. A resumed
    run (start_step > 0) first drops the rows a killed run logged after its last save, and a line the kill cut short."""

    def __init__(self, out_dir: str | None, total_steps: int, enabled: bool = True, start_step: int = 0, show=None):
        self.path = os.path.join(out_dir, "log.jsonl") if out_dir and enabled else None
        self.total, self.enabled, self.start_step, self.show = total_steps, enabled, start_step, show
        self.t0, tmp = time.time(), f"{self.path}.tmp-{os.getpid()}"
        if self.path and os.path.exists(self.path):
            with open(self.path) as f:
                rows = [line for line in f if line.endswith("}\n") and json.loads(line)["step"] <= start_step]
            with open(tmp, "w") as f:
                f.writelines(rows)
            os.replace(tmp, self.path)

    def log(self, step: int, **metrics):
        if not self.enabled:
            return
        elapsed = time.time() - self.t0
        eta = elapsed / max(step - self.start_step, 1) * max(self.total - step, 0)
        row = {"step": step, **{k: float(v) if hasattr(v, "item") else v for k, v in metrics.items()}}
        shown = [f"{k} {row[k]:.4g}" if isinstance(row[k], float) else f"{k} {row[k]}"
                 for k in (metrics if self.show is None else self.show) if k in metrics]
        print(" | ".join([f"step {step}/{self.total}", *shown, f"eta {eta:.0f}s"]), flush=True)
        if self.path:
            with open(self.path, "a") as f:
                f.write(json.dumps({**row, "elapsed_s": round(elapsed, 2)}) + "\n")
