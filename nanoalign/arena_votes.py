"""The arena's votes: their log (votes.jsonl, and the preference rows of prefs.jsonl derived from it) and the
Bradley–Terry ratings of the models that the votes rank (Chiang et al. 2024, Chatbot Arena), on the Elo scale.
"""
import json
import os
import sys
import threading
import time

import numpy as np

from .cli import check

WINNERS = ("A", "B", "tie", "both_bad")
SCORE = {"A": 1.0, "B": 0.0, "tie": 0.5, "both_bad": 0.5}  # A's share of the game: a tie is half a win each way


def bradley_terry(W: np.ndarray, prior: float = 1.0, iters: int = 10000, tol: float = 1e-7) -> np.ndarray:
    """W[i, j] = wins of model i over model j -> Bradley–Terry ratings on the Elo scale, mean 1000:
    P(i beats j) = 1 / (1 + 10^((R_j - R_i) / 400)). Fit by Hunter's (2004) MM iteration on the strengths
    p = 10^(R / 400): p_i <- W_i / sum_j n_ij / (p_i + p_j). A model that never lost has no finite maximum-likelihood
    rating, so `prior` games, split half and half, are added between every two models that met (0: the plain MLE)."""
    W = W + prior / 2 * (W + W.T > 0)
    N = W + W.T  # games between i and j
    p = np.ones(len(W))
    for _ in range(iters):
        p, old = W.sum(1) / (N / (p[:, None] + p[None, :])).sum(1), p
        p = p / np.exp(np.log(p).mean())  # only ratios are identified: fix the geometric mean at 1
        if np.abs(p - old).max() < tol:
            break
    return 1000 + 400 * np.log10(p)


def leaderboard(votes: list[dict], n_boot: int = 200, seed: int = 0) -> list[dict]:
    """Ratings, best first, with 95% intervals from refits on the votes resampled with replacement (bootstrap)."""
    if not votes:
        return []
    names = sorted({v[k] for v in votes for k in ("model_a", "model_b")})
    ix, m, n = {name: i for i, name in enumerate(names)}, len(names), len(votes)
    ia, ib = (np.array([ix[v[k]] for v in votes], dtype=int) for k in ("model_a", "model_b"))
    s = np.array([SCORE[v["winner"]] for v in votes])

    def fit(k):  # the votes with indices k -> ratings (m,); W[i, j] = wins of model i over model j
        W = np.zeros((m, m))
        np.add.at(W, (ia[k], ib[k]), s[k])
        np.add.at(W, (ib[k], ia[k]), 1 - s[k])
        return bradley_terry(W)

    rng = np.random.default_rng(seed)
    boots = np.array([fit(rng.integers(0, n, n)) for _ in range(n_boot)])  # (n_boot, m)
    lo, hi = np.percentile(boots, [2.5, 97.5], axis=0)  # a model missing from a resample sits at the mean there
    rating, count = fit(np.arange(n)), np.bincount(ia, minlength=m) + np.bincount(ib, minlength=m)
    rows = [{"model": name, "rating": float(rating[i]), "lo": float(lo[i]), "hi": float(hi[i]),
             "votes": int(count[i])} for i, name in enumerate(names)]
    return sorted(rows, key=lambda r: -r["rating"])


def format_board(rows: list[dict]) -> str:
    if not rows:
        return "no votes yet"
    w = max([5] + [len(r["model"]) for r in rows])
    return "\n".join([f"{'model':<{w}}  rating  95% interval   votes"] + [f"{r['model']:<{w}}  {r['rating']:6.0f}  "
                     f"[{r['lo']:4.0f}, {r['hi']:4.0f}]  {r['votes']:6d}" for r in rows])


def vote_to_pref(v: dict) -> dict | None:
    """A decisive vote -> a TRL preference row; a tie or both-bad says nothing about which answer is better."""
    if v["winner"] not in ("A", "B"):
        return None
    win, lose = ("answer_a", "answer_b") if v["winner"] == "A" else ("answer_b", "answer_a")
    return {"prompt": v["prompt"], "chosen": v[win], "rejected": v[lose]}


def read_votes(path: str, repair: bool = False) -> list[dict]:
    """votes.jsonl -> votes. A last line without its newline was never confirmed (the server died mid-write): it is
    skipped, and with repair=True cut off, so that the next vote starts on a fresh line."""
    check(os.path.isfile(path), f"{path}: no such file")
    with open(path, "rb") as f:
        raw = f.read()
    whole = raw[:raw.rfind(b"\n") + 1]
    if len(whole) < len(raw):
        print(f"warning: {path}: skipping a truncated last line (a vote that was never confirmed)", file=sys.stderr)
        if repair:
            os.truncate(path, len(whole))
    votes = []
    for i, line in enumerate(whole.split(b"\n")[:-1], 1):
        try:
            v = json.loads(line)
            ok = (v["winner"] in WINNERS and v["model_a"] != v["model_b"]
                  and all(k in v for k in ("prompt", "answer_a", "answer_b")))
        except (ValueError, RecursionError, KeyError, TypeError):
            ok = False
        check(ok, f"{path}:{i}: not a vote (a JSON object with prompt, model_a, model_b, answer_a, answer_b, winner)")
        votes.append(v)
    return votes


class VoteLog:
    """OUT/votes.jsonl, the record, and OUT/prefs.jsonl, derived from it; appends are serialized by a lock."""

    def __init__(self, out: str):
        os.makedirs(out, exist_ok=True)
        self.votes_path, self.prefs_path = os.path.join(out, "votes.jsonl"), os.path.join(out, "prefs.jsonl")
        self.lock = threading.Lock()
        self.votes = read_votes(self.votes_path, repair=True) if os.path.exists(self.votes_path) else []
        with open(self.prefs_path + ".tmp", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(p, ensure_ascii=False) + "\n" for v in self.votes if (p := vote_to_pref(v)))
        os.replace(self.prefs_path + ".tmp", self.prefs_path)

    def append(self, row: dict, names, answers, winner: str, annotator: str) -> int:
        vote = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "prompt": row["prompt"],
                "prompt_id": row.get("id"), "model_a": names[0], "model_b": names[1], "answer_a": answers[0],
                "answer_b": answers[1], "winner": winner, "annotator": annotator}
        with self.lock:
            self._write(self.votes_path, vote)
            self.votes.append(vote)
            if (pref := vote_to_pref(vote)) is not None:
                self._write(self.prefs_path, pref)
            return len(self.votes)

    @staticmethod
    def _write(path: str, row: dict):
        with open(path, "ab") as f:
            end = f.seek(0, os.SEEK_END)
            try:
                f.write((json.dumps(row, ensure_ascii=False) + "\n").encode())
                f.flush()
                os.fsync(f.fileno())  # on disk before the page says "recorded"
            except OSError:
                f.truncate(end)  # e.g. a full disk: leave no torn line for the next vote to follow
                raise
