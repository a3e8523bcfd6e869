"""nanoalign.report's reading half, plain Python: logs, metrics.json and results.json -> the series it draws."""
import json
import math
import os
from dataclasses import dataclass

from .cli import UserError, check

BIN = 5  # PPO iterations per point of the over-optimisation curve


def read_log(path: str) -> list[dict]:
    """The rows of a log.jsonl. A last line without its newline is a row still being written: skipped if it does
    not parse. Any other bad line is a `FILE:LINE` error."""
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = f.read().split("\n")  # a file that ends in a newline gives a last "" here
    rows = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)  # json reads the NaN / Infinity that json.dumps writes for a diverged step
        except ValueError:
            if i == len(lines):
                continue
            raise UserError(f"{path}:{i}: not a JSON line")
        if not isinstance(row, dict) or type(row.get("step")) is not int:
            raise UserError(f"{path}:{i}: a log row is a JSON object with an integer \"step\"")
        rows.append(row)
    return rows


def finite(v) -> bool:
    return type(v) in (int, float) and math.isfinite(v)


def series(rows: list[dict], key: str) -> tuple[list, list]:
    """(steps, values) of the rows that logged `key` as a finite number."""
    pts = [(r["step"], float(r[key])) for r in rows if finite(r.get(key))]
    return [p[0] for p in pts], [p[1] for p in pts]


def algorithm(rows: list[dict]) -> str | None:
    """Which script wrote the log, from the keys only it logs."""
    keys = set().union(*rows)
    for algo, needs in (("ppo", {"score", "kl"}), ("dpo", {"chosen_rewards"}), ("rm", {"reward_mean"}),
                        ("sft", {"loss"})):  # in this order: DPO and PPO log a loss too
        if needs <= keys:
            return algo
    return None


def overoptimization(rows: list[dict]) -> tuple[list, list, list]:
    """(kl, proxy, gold): the rows of a PPO log that have all three as finite numbers, in logged order. The proxy is
    the reward PPO climbs (the RM's score), the gold the checker it never sees; Gao et al. 2022 plot both against
    the policy's distance from π_ref. A run whose reward is the gold judge has no proxy (score == gold): none."""
    pts = [(r["kl"], r["score"], r["gold"]) for r in rows if all(finite(r.get(k)) for k in ("kl", "score", "gold"))]
    if all(s == g for _, s, g in pts):
        return [], [], []
    return [float(p[0]) for p in pts], [float(p[1]) for p in pts], [float(p[2]) for p in pts]


def binned(kl: list, ys: list, k: int = BIN) -> tuple[list, list]:
    """Points sorted by KL, then the means of each k of them (the last bin takes what is left): one iteration's
    score is a mean over a few responses, too noisy to read a trend from alone."""
    pts = sorted(zip(kl, ys))
    bins = [pts[i:i + k] for i in range(0, len(pts), k)]
    return [sum(p[0] for p in b) / len(b) for b in bins], [sum(p[1] for p in b) / len(b) for b in bins]


def win_stderr(wins: int, ties: int, losses: int) -> float:
    """Standard error of the win rate with ties as ½ (AlpacaEval): each prompt scores 1, ½ or 0."""
    n = wins + ties + losses
    p = (wins + 0.5 * ties) / n
    var = (wins * (1 - p) ** 2 + ties * (0.5 - p) ** 2 + losses * p ** 2) / max(n - 1, 1)
    return math.sqrt(var / n)


def result_bars(results: dict) -> tuple[list, list, str | None]:
    """results.json of `evaluate --compare` -> (gold: [(model, mean, se)], wins: [(model, rate, se)], ref). The
    reference is the model evaluated on its own samples (KL 0, every prompt a tie); it has no win-rate bar."""
    models = {k: v for k, v in results.items() if isinstance(v, dict) and finite(v.get("gold_mean"))}
    ref = next((k for k, v in models.items() if v.get("kl") == 0 and v.get("ties") == v.get("n")), None)
    gold = [(k, v["gold_mean"], v["gold_stderr"] if finite(v.get("gold_stderr")) else 0.0) for k, v in models.items()]
    wins = []
    for k, v in models.items():
        c = [v.get(x) for x in ("wins", "ties", "losses")]
        if k != ref and finite(v.get("win_rate")) and all(type(x) is int and x >= 0 for x in c) and sum(c) > 0:
            wins.append((k, v["win_rate"], win_stderr(*c)))
    return gold, wins, ref


def read_json(path: str):
    """A JSON file's content, or None where it is missing or does not parse."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


@dataclass
class Run:
    name: str  # the label in legends and the key of the run's colour
    log: str  # path of its log.jsonl
    rows: list


def find_inputs(paths: list[str]) -> tuple[list[str], str | None, bool]:
    """-> (run directories and log files, results.json, finished). A directory that is no run is a directory of
    runs: its runs in the order they started (out/demo reads SFT, RM, DPO, PPO) and its results.json. Finished:
    every run wrote metrics.json and every directory of runs its results.json (a log file never finishes)."""
    is_run = lambda d: any(os.path.isfile(os.path.join(d, f)) for f in ("log.jsonl", "run.json"))  # noqa: E731
    started = lambda d: (min(os.path.getmtime(os.path.join(d, f)) for f in ("log.jsonl", "run.json")  # noqa: E731
                             if os.path.isfile(os.path.join(d, f))), d)
    runs, results, finished = {}, None, True
    for p in paths:
        check(os.path.exists(p), f"{p}: no such file or directory")
        one = os.path.isfile(p) or is_run(p)
        subs = [p] if one else sorted((d for d in (os.path.join(p, s) for s in os.listdir(p))
                                       if os.path.isdir(d) and is_run(d)), key=started)
        if not one:
            res = os.path.join(p, "results.json")
            check(bool(subs) or os.path.isfile(res), f"{p}: neither a run (no log.jsonl) nor a directory of runs")
            check(results is None or not os.path.isfile(res), f"{p}: a second results.json; give one demo directory")
            results = res if os.path.isfile(res) else results
            finished &= os.path.isfile(res)
        for d in subs:  # out/demo and out/demo/sft name one run once
            runs.setdefault(os.path.realpath(d if os.path.isfile(d) else os.path.join(d, "log.jsonl")), d)
            finished &= os.path.isfile(os.path.join(d, "metrics.json"))  # False for a log file
    return list(runs.values()), results, finished


def names_for(paths: list[str]) -> list[str]:
    """Short labels: the run directory's name (a log file's stem), with its parent's when two would be equal."""
    def label(p, depth):
        p = os.path.abspath(p)
        if os.path.isfile(p):
            p = os.path.dirname(p) if os.path.basename(p) == "log.jsonl" else os.path.splitext(p)[0]
        return "/".join(p.split(os.sep)[-depth:])
    names = [label(p, 1) for p in paths]
    names = [label(p, 2) if names.count(n) > 1 else n for p, n in zip(paths, names)]
    return [n if names.count(n) == 1 else f"{n}#{i}" for i, n in enumerate(names)]


def load_runs(paths: list[str], waiting: bool = False) -> list[Run]:
    """Read every log; a run with no complete row yet is an error, or (waiting: --watch) left out for now.
    train_sft.py evaluates after its last log line, so metrics.json's eval_* numbers go to the last row."""
    runs = []
    for name, p in zip(names_for(paths), paths):
        log = p if os.path.isfile(p) else os.path.join(p, "log.jsonl")
        rows = read_log(log) if os.path.isfile(log) else []
        if not rows:
            check(waiting, f"{log}: no logged steps yet")
            continue
        check(algorithm(rows) is not None, f"{log}: not a nanoalign training log (no loss or score)")
        m = read_json(os.path.join(p, "metrics.json"))  # None: still running, or a log file
        if isinstance(m, dict) and m.get("steps") == rows[-1]["step"]:
            rows[-1] = {**{k: v for k, v in m.items() if k.startswith("eval_") and finite(v)}, **rows[-1]}
        runs.append(Run(name, log, rows))
    return runs
