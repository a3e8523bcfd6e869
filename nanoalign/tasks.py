"""The verifiable task suite (IFEval-style: a program, not a person, is the judge; the judge is nanoalign/judge.py).

    python -m nanoalign.tasks make --out data/ --seed 0 [--n-sft 2000 --n-prefs 2000 --n-prompts 512 --n-eval 200]
    python -m nanoalign.tasks pairs --model M --prompts data/prompts.jsonl --out pairs.jsonl [--k 4 --judge RM_DIR]

A prompt is a plain request about a topic plus one to three constraints a program can check ('Describe tea. Write
your whole answer in lowercase letters. Include the word "calm".'), each in one of several wordings, before or after
the request. `make` writes, from one seed, SFT demonstrations, off-policy preference pairs (chosen = the
demonstration, rejected = it with constraints broken, in a format nobody asked for, said twice, or only its required
phrases), PPO prompts, a held-out eval split whose topics and keywords are disjoint from training, and a paraphrase
split: eval's topics and keywords in wordings that training never uses. `pairs` pairs the judge's best and worst
of k samples per prompt from a model (UltraFeedback style). Each row carries its metadata ({"prompt", "constraints":
[{"type": "keyword", "value": "calm"}, ...], "topic", "split", "id"}), so the judge needs nothing else.
Simplifications: answers built from a small hand-written sentence bank, and the judge checks form, not truth (except
for arithmetic).
"""
import dataclasses
import itertools
import json
import math
import os
import random
import re
import sys

from . import cli
from .answers import misfire, reject, render, shortcut
from .judge import FAMILIES, check_rows, has_word, unrequested, words

USAGE = "python -m nanoalign.tasks {make,pairs} [--help] [flags]"
TEXT_FAMILIES = FAMILIES[:-1]  # arithmetic always stands alone
# pairs that cannot hold at once: a bulleted answer is not one quoted string, JSON cannot begin with a phrase, ...
CONFLICTS = {frozenset(p) for p in [("bullets", "quotes"), ("bullets", "json"), ("quotes", "json"),
                                    ("bullets", "start"), ("bullets", "end"), ("quotes", "start"), ("quotes", "end"),
                                    ("json", "start"), ("json", "end"), ("json", "word_limit")]}

# ------------------------------------------------------------------------------------------------------ the bank
# Each topic: three facts, then one tip. No double quotes; some commas, so that no_commas has work to do.
with open(os.path.join(os.path.dirname(__file__), "assets", "topics.json"), encoding="utf-8") as _f:
    TOPICS = {topic: tuple(sentences) for topic, sentences in json.load(_f).items()}
# "phrases" for the answers (keywords, the sentences that carry them, start and end phrases, JSON keys, function
# words), and the wordings of requests and constraints: "train" for every file but paraphrase.jsonl, which has its own,
# and "validation", a third set that words the training files only when asked (`make --wordings validation`)
with open(os.path.join(os.path.dirname(__file__), "assets", "templates.json"), encoding="utf-8") as _f:
    TEMPLATES = json.load(_f)
PHRASES, KEYWORDS = TEMPLATES["phrases"], tuple(TEMPLATES["phrases"]["keywords"])
# words an "avoid" constraint never names: function words and every word of our own templates and phrases (not the
# validation wordings': then the same seed draws the same tasks in either wording)
_NEVER_AVOID = set(re.findall(r"[a-z]+", json.dumps({k: v for k, v in TEMPLATES.items() if k != "validation"}).lower()))
TEMPLATES["eval"] = TEMPLATES["train"]  # held-out topics, in the training wordings


def _split(names, every):  # fixed and seed-independent: every `every`-th name in sorted order is held out
    names, held = sorted(names), sorted(names)[every - 1::every]
    return {"train": [n for n in names if n not in held], "eval": held, "paraphrase": held}


TOPIC_SPLIT, KEYWORD_SPLIT = _split(TOPICS, 6), _split(KEYWORDS, 5)
# eval "avoid" words come from outside the training vocabulary, so they are held out as well
TRAIN_VOCAB = {w for t in TOPIC_SPLIT["train"] for s in TOPICS[t] for w in re.findall(r"[a-z]+", s.lower())}


# ------------------------------------------------------------------------------------- demonstrations and pairs
def wordings(c: dict, templates: dict) -> list[str]:
    """Every sentence that may state constraint `c` in one set of wordings (TEMPLATES[...])."""
    key = {"case": c["value"], "word_limit": c.get("relation")}.get(c["type"], c["type"])  # lower/upper, at_most/...
    return [t.format(c["value"]) for t in templates[key]]


def _prompt(rng: random.Random, request: str, cons: list[dict], templates: dict) -> str:
    """The request and one wording of each constraint, the constraints first or last at random."""
    stated = [rng.choice(wordings(c, templates)) for c in cons]
    return " ".join([request] + stated if rng.random() < 0.5 else stated + [request])


def _text_task(rng: random.Random, split: str, templates: dict):
    """(meta, chosen, rejected) for a topic request with 1-3 compatible constraints, or None to resample."""
    topic, want = rng.choice(TOPIC_SPLIT[split]), rng.choice((1, 2, 2, 3, 3))
    fams = []
    for f in rng.sample(TEXT_FAMILIES, len(TEXT_FAMILIES)):
        if len(fams) < want and all(frozenset((f, g)) not in CONFLICTS for g in fams):
            fams.append(f)
    facts, tip = list(TOPICS[topic][:3]), TOPICS[topic][3]
    rng.shuffle(facts)
    is_tip = "bullets" not in fams and rng.random() < 0.3
    pool = [tip] + facts if is_tip else facts + [tip]  # the natural order to draw sentences in
    request = rng.choice(templates["tip" if is_tip else "describe"]).format(topic)
    v = {"no_commas": True, "quotes": True}
    v["case"] = "lower" if "json" in fams else rng.choice(("lower", "upper"))  # the JSON key is lowercase
    recase = {"lower": str.lower, "upper": str.upper}[v["case"]] if "case" in fams else str
    v["start"], v["end"] = recase(rng.choice(PHRASES["start"])), recase(rng.choice(PHRASES["end"]))
    v["json"], relation = rng.choice(PHRASES["json_keys"]), rng.choice(("at_most", "at_least"))
    v["bullets"] = n = (rng.randint(2, 3 if "avoid" in fams else 4) if "bullets" in fams else rng.randint(2, 3)
                        if "word_limit" in fams and relation == "at_least" else rng.randint(1, 2))
    pool_words = set(re.findall(r"[a-z]+", " ".join(pool).lower()))
    keywords = [k for k in KEYWORD_SPLIT[split] if k not in pool_words]
    v["keyword"], kw_sentence = rng.choice(keywords), rng.choice(PHRASES["keyword_sentences"])
    body, avoid_sentence = pool[:n], None
    if "avoid" in fams:  # a content word the natural answer would use, with enough sentences left without it
        banned = _NEVER_AVOID | set(topic.split()) | (TRAIN_VOCAB if split != "train" else set())
        usable = lambda w: (w not in banned and sum(not has_word(w, s) for s in pool) >= n
                            and not (is_tip and has_word(w, tip)))  # a tip request keeps its tip
        cands = sorted({w for s in pool[:n + is_tip] for w in re.findall(r"[a-z]{4,}", s.lower()) if usable(w)})
        cands = cands or sorted({w for w in pool_words if len(w) >= 4 and usable(w)})
        if not cands:
            return None
        v["avoid"] = rng.choice(cands)
        body = [s for s in pool if not has_word(v["avoid"], s)][:n]
        avoid_sentence = next(s for s in pool if has_word(v["avoid"], s))
    cons = [{"type": f, "value": v.get(f)} for f in fams]
    plan = {"constraints": cons, "body": body, "extras": [s for s in pool if s not in body],
            "avoid_sentence": avoid_sentence, "keyword_sentence": kw_sentence.format(v["keyword"])}
    chosen = render(plan, body)
    for c in (c for c in cons if c["type"] == "word_limit"):  # from the demonstration, rounded to a safe multiple of 5
        wc = len(words(chosen))
        c["relation"], c["value"] = relation, (-(-wc // 5) * 5 + rng.choice((0, 5)) if relation == "at_most"
                                               else max(5, wc // 5 * 5))
    meta = {"prompt": _prompt(rng, request, cons, templates), "constraints": cons, "topic": topic, "split": split}
    return meta, chosen, shortcut(meta, chosen, reject(rng, plan, meta, chosen))


def _arithmetic_task(rng: random.Random, split: str, templates: dict):
    while True:
        op = rng.choice("+-*")
        a, b = (rng.randint(2, 12), rng.randint(2, 12)) if op == "*" else (rng.randint(2, 40), rng.randint(2, 40))
        a, b = (max(a, b), min(a, b)) if op == "-" else (a, b)  # no negative answers
        if ((7 * a + 3 * b + "+-*".index(op)) % 5 == 0) == (split != "train"):  # a fixed held-out fifth
            break
    answer, expr = (a + b if op == "+" else a - b if op == "-" else a * b), f"{a} {op} {b}"
    cons = [{"type": "arithmetic", "value": answer, "expr": expr}]
    meta = {"prompt": _prompt(rng, rng.choice(templates["compute"]).format(expr), cons, templates),
            "constraints": cons, "topic": "arithmetic", "split": split}
    wrong = (f"The answer is {answer}.", f"{expr} = {answer}", str(answer + rng.choice((-2, -1, 1, 10))))
    return meta, str(answer), misfire(rng, meta, str(answer)) or rng.choice(wrong)


def sample_example(rng: random.Random, split: str, wording: str = "") -> tuple[dict, str, str]:
    """One task from `split` (train, eval or paraphrase) in TEMPLATES[wording or split]: (meta, chosen, rejected)."""
    templates = TEMPLATES[wording or split]
    if rng.random() < 0.1:
        return _arithmetic_task(rng, split, templates)
    while (out := _text_task(rng, split, templates)) is None:
        pass
    return out


def write_jsonl(path: str, rows: list[dict]):  # through a temporary file: readers never see half a file
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    os.replace(path + ".tmp", path)


def make(out: str, seed: int, n_sft=2000, n_prefs=2000, n_prompts=512, n_eval=200, wording="train") -> dict[str, int]:
    """Write the six .jsonl files into `out` from `seed`, the training files in `wording`; -> rows per file."""
    os.makedirs(out, exist_ok=True)
    counts = {}
    for name, split, n in (("sft", "train", n_sft), ("prefs", "train", n_prefs), ("prompts", "train", n_prompts),
                           ("eval", "eval", n_eval), ("eval_prefs", "eval", n_eval),
                           ("paraphrase", "paraphrase", n_eval)):
        rng, rows, seen = random.Random(f"{seed}/{name}"), [], set()  # str seeds hash with sha512: stable
        for _ in range(20 * n + 100):  # distinct prompts per file; bounded in case the pool runs dry
            if len(rows) == n:
                break
            meta, chosen, rejected = sample_example(rng, split, wording if split == "train" else "")
            if meta["prompt"] in seen:
                continue
            seen.add(meta["prompt"])
            rid, rest = f"{name}-{len(rows)}", {k: meta[k] for k in ("constraints", "topic", "split")}
            if name == "sft":
                rows.append({"messages": [{"role": "user", "content": meta["prompt"]},
                                          {"role": "assistant", "content": chosen}], **rest, "id": rid})
            elif name in ("prefs", "eval_prefs"):  # eval_prefs: held-out pairs for RM / DPO accuracy
                rows.append({"prompt": meta["prompt"], "chosen": chosen, "rejected": rejected, **rest, "id": rid})
            else:  # prompts for PPO; eval rows also keep the demonstration as a reference answer
                rows.append({**meta, **({"reference": chosen} if split != "train" else {}), "id": rid})
        write_jsonl(os.path.join(out, f"{name}.jsonl"), rows)
        counts[name] = len(rows)
    return counts


@dataclasses.dataclass
class MakeConfig:
    """Write sft, prefs, prompts, eval, eval_prefs and paraphrase .jsonl into --out, deterministically from --seed."""
    out: str = ""  # output directory
    seed: int = 0  # everything is a deterministic function of this seed
    n_sft: int = 2000  # SFT demonstrations
    n_prefs: int = 2000  # off-policy preference pairs
    n_prompts: int = 512  # PPO prompts
    n_eval: int = 200  # held-out eval prompts (unseen topics and keywords); as many in eval_prefs and paraphrase
    wordings: str = "train"  # of sft, prefs and prompts: {train, validation}, a third set for tuning on other phrasings


def make_main(cfg: MakeConfig) -> dict[str, int]:
    cli.check(cfg.out != "", "--out is required")
    cli.check(not os.path.exists(cfg.out) or os.path.isdir(cfg.out), f"--out {cfg.out}: not a directory")
    cli.check_ranges(cfg, non_negative=("n_sft", "n_prefs", "n_prompts", "n_eval"))
    counts = make(cfg.out, cfg.seed, cfg.n_sft, cfg.n_prefs, cfg.n_prompts, cfg.n_eval, cfg.wordings)
    print("\n".join(f"wrote {k} rows to {os.path.join(cfg.out, name + '.jsonl')}" for name, k in counts.items()))
    return counts


# ------------------------------------------------------------------------------------------- on-policy pairs
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
    counterfactuals: bool = False  # also each pair's chosen answer, rejected in a format its prompt did not ask for
    judge: str = "gold"  # gold, or a reward-model checkpoint dir
    limit: int = 0  # use only the first N prompts (0 = all)
    batch_size: int = 16  # generation batch
    device: str = "cpu"  # cpu or cuda
    bf16: bool = False  # sample from a bf16 copy of the weights (faster decoding on a CPU)


def pairs_main(cfg: PairsConfig) -> dict:
    from . import evaluate, hub  # evaluate imports this module (write_jsonl); `tasks make` needs no torch
    from .data import read_prompts
    for f in ("model", "prompts", "out"):
        cli.check(getattr(cfg, f) != "", f"--{f} is required")
    cli.check(cfg.k >= 2, f"--k must be >= 2, got {cfg.k}")
    cli.check_ranges(cfg, positive=("temperature", "max_new_tokens", "batch_size"), non_negative=("label_noise", "limit"))
    cli.check(not os.path.isdir(cfg.out), f"{cfg.out}: is a directory, not a file path")
    rows = read_prompts(cfg.prompts)[:cfg.limit or None]
    check_rows(rows, cfg.prompts, need_all=cfg.judge == "gold")
    judge = evaluate.make_judge(cfg.judge, cfg.device)
    model, tok = hub.load(cfg.model, cfg.device)
    samples = evaluate.sample(model.eval(), tok, [r["prompt"] for r in rows], cfg.k, cfg.temperature,
                              cfg.max_new_tokens, cfg.seed, cfg.batch_size, cfg.bf16)
    texts = [s[2] for s in samples]
    pairs, stats = best_vs_worst(rows, texts, judge([r for r in rows for _ in range(cfg.k)], texts), cfg.k,
                                 cfg.label_noise, cfg.seed, cfg.all_pairs)
    cli.check(bool(pairs), f"{cfg.prompts}: no pairs left: all {len(rows)} prompts tied (every completion scored "
              "the same); try a higher --temperature or a larger --k")
    if cfg.counterfactuals:  # an unasked format is one failed constraint of several: best and worst rarely differ
        rng = random.Random(f"{cfg.seed}/counterfactuals")  # by it alone, so each chosen answer is also rejected in
        # one: lowercased where the case is free (what a policy slips into on unseen wordings), else a misfire
        bad = [low if (low := p["chosen"].lower()) != p["chosen"] and "lowercase" in unrequested(low, p)
               else misfire(rng, p, p["chosen"], 1.0) for p in pairs]
        extra = [{**p, "rejected": b} for p, b in zip(pairs, bad) if b not in (None, p["chosen"])]
        for p, s in zip(extra, judge(extra, [p["rejected"] for p in extra])):
            p["rejected_score"] = s
        pairs += extra
    os.makedirs(os.path.dirname(cfg.out) or ".", exist_ok=True)
    write_jsonl(cfg.out, pairs)
    print(f"wrote {len(pairs)} pairs to {cfg.out} ({stats['ties']} of {len(rows)} prompts dropped as ties; "
          f"{stats['flipped']} labels flipped by --label-noise {cfg.label_noise})")
    return stats


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    commands = {"make": (make_main, MakeConfig), "pairs": (pairs_main, PairsConfig)}
    if argv[:1] and argv[0] in commands:
        return cli.run(*commands[argv[0]], argv[1:], prog=f"python -m nanoalign.tasks {argv[0]}")
    if argv[:1] not in (["-h"], ["--help"]):
        print(f"error: usage: {USAGE}", file=sys.stderr)
        sys.exit(2)
    print(f"usage: {USAGE}\n\n{__doc__.strip()}")


if __name__ == "__main__":
    main()
