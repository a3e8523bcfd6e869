"""On-policy preference pairs, UltraFeedback style: k samples per prompt from a model, judged, best vs worst.

    python -m nanoalign.tasks pairs --model M --prompts data/prompts.jsonl --out pairs.jsonl [--k 4 --judge RM_DIR]
"""
import dataclasses
import itertools
import math
import os
import random

from . import cli, evaluate
from .data import read_prompts
from .hub import load
from .judge import check_rows
from .tasks import write_jsonl


def best_vs_worst(rows: list[dict], texts: list[str], scores: list[float], k: int, label_noise: float = 0.0,
                  seed: int = 0, all_pairs: bool = False) -> tuple[list[dict], dict]:
    """Pairs from k judged completions per row (prompt-major): the best is chosen, the worst rejected. all_pairs:
    every two distinct completions whose scores differ, the higher chosen (up to k(k-1)/2 per prompt, best first):
    the judge's whole ranking, not only its ends. A prompt with no such pair (equal scores, or one text) carries no
    preference and is dropped as a tie. With label_noise T > 0, each pair is flipped with the Bradley-Terry
    probability 1 - sigmoid((s_best - s_worst) / T): annotators who disagree more often the closer the two responses
    are (T -> inf: a coin flip; T = 0: never)."""
    rng, pairs, ties, flipped = random.Random(f"{seed}/label-noise"), [], 0, 0
    for i, row in enumerate(rows):
        group = list(zip(scores[i * k:(i + 1) * k], texts[i * k:(i + 1) * k]))
        if all_pairs:
            ranked = sorted({t: s for s, t in group}.items(), key=lambda g: -g[1])
            found = [((s1, t1), (s2, t2)) for (t1, s1), (t2, s2) in itertools.combinations(ranked, 2) if s1 > s2]
        else:
            (hi, best), (lo, worst) = max(group, key=lambda g: g[0]), min(group, key=lambda g: g[0])
            found = [((hi, best), (lo, worst))] if hi != lo and best != worst else []
        ties += not found
        meta = {key: v for key, v in row.items() if key not in ("prompt", "line", "reference")}
        for (hi, best), (lo, worst) in found:
            flip = label_noise > 0 and rng.random() < 1 - 1 / (1 + math.exp(-(hi - lo) / label_noise))
            flipped += flip
            (c, sc), (r, sr) = ((worst, lo), (best, hi)) if flip else ((best, hi), (worst, lo))
            pairs.append({"prompt": row["prompt"], "chosen": c, "rejected": r, **meta, "chosen_score": sc,
                          "rejected_score": sr})
    return pairs, {"pairs": len(pairs), "ties": ties, "flipped": flipped, "prompts": len(rows)}


@dataclasses.dataclass
class PairsConfig:
    """On-policy preference pairs: the judge's best vs worst of --k samples per prompt from --model (or all pairs)."""
    model: str = ""  # policy to sample from (preset, alias, checkpoint dir, .gguf)
    prompts: str = ""  # prompts JSONL (with task metadata for the gold judge)
    out: str = ""  # output preference JSONL: prompt, chosen, rejected, the prompt's metadata, both scores
    k: int = 4  # completions sampled per prompt
    temperature: float = 1.0  # sampling temperature (> 0: k greedy samples would be identical)
    max_new_tokens: int = 96  # per completion
    seed: int = 0  # sampling and label-noise seed
    label_noise: float = 0.0  # Bradley-Terry temperature T of annotator noise (0 = clean labels)
    all_pairs: bool = False  # every non-tied pair of the k samples (up to k(k-1)/2 per prompt), not only best vs worst
    judge: str = "gold"  # gold, or a reward-model checkpoint dir
    limit: int = 0  # use only the first N prompts (0 = all)
    batch_size: int = 16  # generation batch
    device: str = "cpu"  # cpu or cuda
    bf16: bool = False  # sample from a bf16 copy of the weights (faster decoding on a CPU)


def pairs_main(cfg: PairsConfig) -> dict:
    for f in ("model", "prompts", "out"):
        cli.check(getattr(cfg, f) != "", f"--{f} is required")
    cli.check(cfg.k >= 2, f"--k must be >= 2, got {cfg.k}")
    cli.check_ranges(cfg, positive=("temperature", "max_new_tokens", "batch_size"), non_negative=("label_noise", "limit"))
    cli.check(not os.path.isdir(cfg.out), f"{cfg.out}: is a directory, not a file path")
    rows = read_prompts(cfg.prompts)[:cfg.limit or None]
    check_rows(rows, cfg.prompts, need_all=cfg.judge == "gold")
    judge = evaluate.make_judge(cfg.judge, cfg.device)
    model, tok = load(cfg.model, cfg.device)
    samples = evaluate.sample(model.eval(), tok, [r["prompt"] for r in rows], cfg.k, cfg.temperature,
                              cfg.max_new_tokens, cfg.seed, cfg.batch_size, cfg.bf16)
    texts = [s[2] for s in samples]
    pairs, stats = best_vs_worst(rows, texts, judge([r for r in rows for _ in range(cfg.k)], texts), cfg.k,
                                 cfg.label_noise, cfg.seed, cfg.all_pairs)
    cli.check(bool(pairs), f"{cfg.prompts}: no pairs left: all {len(rows)} prompts tied (every completion scored "
              "the same); try a higher --temperature or a larger --k")
    os.makedirs(os.path.dirname(cfg.out) or ".", exist_ok=True)
    write_jsonl(cfg.out, pairs)
    print(f"wrote {len(pairs)} pairs to {cfg.out} ({stats['ties']} of {len(rows)} prompts dropped as ties; "
          f"{stats['flipped']} labels flipped by --label-noise {cfg.label_noise})")
    return stats
