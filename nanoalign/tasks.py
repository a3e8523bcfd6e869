"""The verifiable task suite (IFEval-style: a program, not a person, is the judge; the judge is nanoalign/judge.py).

    python -m nanoalign.tasks make --out data/ --seed 0 [--n-sft 2000 --n-prefs 2000 --n-prompts 512 --n-eval 200]
    python -m nanoalign.tasks pairs --model M --prompts data/prompts.jsonl --out pairs.jsonl [--k 4 --judge RM_DIR]

A prompt is a plain request about a topic plus one to three constraints a program can check ('Describe tea. Write
your whole answer in lowercase letters. Include the word "calm".'). `make` writes, from one seed, SFT
demonstrations, off-policy preference pairs (chosen = the demonstration, rejected = it with constraints broken), PPO
prompts, and a held-out eval split whose topics and keywords are disjoint from training. `pairs` pairs the judge's
best and worst of k samples per prompt from a model (UltraFeedback style). Each row carries its metadata
({"prompt", "constraints": [{"type": "keyword", "value": "calm"}, ...], "topic", "split", "id"}), so the judge needs
nothing else. Simplifications: one phrasing per constraint, answers built from a small hand-written sentence bank,
and the judge checks form, not truth (except for arithmetic).
"""
import dataclasses
import json
import os
import random
import re
import sys

from . import cli
from .answers import reject, render
from .judge import FAMILIES, has_word, words

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
KEYWORDS = ("bright", "calm", "charming", "cheerful", "classic", "clever", "cozy", "curious", "elegant", "fresh",
            "friendly", "gentle", "graceful", "handy", "humble", "lively", "lovely", "modern", "neat", "peaceful",
            "pleasant", "practical", "quiet", "reliable", "simple", "steady", "sturdy", "tidy", "useful", "vivid")
KEYWORD_SENTENCES = ("Overall it feels {}.", "Many people find it {}.", "In short it is {}.")
START_PHRASES = ("Sure thing.", "Here is my answer.", "Good question.", "Happy to help.", "Let me explain.")
END_PHRASES = ("Hope this helps.", "That is all.", "Thanks for asking.", "Have a nice day.", "That sums it up.")
JSON_KEYS = ("answer", "summary", "text", "reply", "response")
DESCRIBE = ("Describe {}.", "Tell me about {}.", "Explain {} in simple terms.", "Write a short note about {}.",
            "What should I know about {}?")
TIP = ("Give one tip about {}.", "Share a helpful tip about {}.")
_STOP = set("""about after also always away been before being both called cannot does each even every from have
    into just like made make many more most much need needs often only other others over rather same some such than
    that their them then there they this those through used uses very well were what when where which while with
    without your""".split())
# words an "avoid" constraint never names: function words and every word of our own templates and phrases
_NEVER_AVOID = _STOP | set(re.findall(r"[a-z]+", " ".join(
    KEYWORD_SENTENCES + START_PHRASES + END_PHRASES + JSON_KEYS + DESCRIBE + TIP).lower()))


def _split(names, every):  # fixed and seed-independent: every `every`-th name in sorted order is held out
    names = sorted(names)
    return {"train": [n for i, n in enumerate(names) if i % every != every - 1], "eval": names[every - 1::every]}


TOPIC_SPLIT, KEYWORD_SPLIT = _split(TOPICS, 6), _split(KEYWORDS, 5)
# eval "avoid" words come from outside the training vocabulary, so they are held out as well
TRAIN_VOCAB = {w for t in TOPIC_SPLIT["train"] for s in TOPICS[t] for w in re.findall(r"[a-z]+", s.lower())}


# ------------------------------------------------------------------------------------- demonstrations and pairs
def describe(c: dict) -> str:
    """The prompt sentence that states constraint `c`."""
    t, v = c["type"], c.get("value")
    return {"case": f"Write your whole answer in {'lowercase' if v == 'lower' else 'capital'} letters.",
            "keyword": f'Include the word "{v}".', "avoid": f'Do not use the word "{v}".',
            "no_commas": "Do not use any commas.", "start": f'Begin your answer with the exact phrase "{v}"',
            "end": f'End your answer with the exact phrase "{v}"', "quotes": "Wrap your whole answer in double quotes.",
            "word_limit": f"Use at {'most' if c.get('relation') == 'at_most' else 'least'} {v} words.",
            "bullets": f'Answer with exactly {v} bullet points that start with "- ".',
            "json": f'Answer with a JSON object that has the key "{v}".'}[t]


def _text_task(rng: random.Random, split: str, hard: bool = False):
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
    request = rng.choice(TIP if is_tip else DESCRIBE).format(topic)
    v = {"no_commas": True, "quotes": True}
    v["case"] = "lower" if "json" in fams else rng.choice(("lower", "upper"))  # the JSON key is lowercase
    recase = {"lower": str.lower, "upper": str.upper}[v["case"]] if "case" in fams else str
    v["start"], v["end"] = recase(rng.choice(START_PHRASES)), recase(rng.choice(END_PHRASES))
    v["json"], relation = rng.choice(JSON_KEYS), rng.choice(("at_most", "at_least"))
    v["bullets"] = n = (rng.randint(2, 3 if "avoid" in fams else 4) if "bullets" in fams else rng.randint(2, 3)
                        if "word_limit" in fams and relation == "at_least" else rng.randint(1, 2))
    pool_words = set(re.findall(r"[a-z]+", " ".join(pool).lower()))
    keywords = [k for k in KEYWORD_SPLIT[split] if k not in pool_words]
    v["keyword"], kw_sentence = rng.choice(keywords), rng.choice(KEYWORD_SENTENCES)
    body, avoid_sentence = pool[:n], None
    if "avoid" in fams:  # a content word the natural answer would use, with enough sentences left without it
        banned = _NEVER_AVOID | set(topic.split()) | (TRAIN_VOCAB if split == "eval" else set())
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
    meta = {"prompt": request + " " + " ".join(describe(c) for c in cons), "constraints": cons, "topic": topic,
            "split": split}
    return meta, chosen, reject(rng, plan, meta, chosen, hard)


def _arithmetic_task(rng: random.Random, split: str):
    while True:
        op = rng.choice("+-*")
        a, b = (rng.randint(2, 12), rng.randint(2, 12)) if op == "*" else (rng.randint(2, 40), rng.randint(2, 40))
        a, b = (max(a, b), min(a, b)) if op == "-" else (a, b)  # no negative answers
        if ("eval" if (7 * a + 3 * b + "+-*".index(op)) % 5 == 0 else "train") == split:  # a fixed split
            break
    answer, expr = (a + b if op == "+" else a - b if op == "-" else a * b), f"{a} {op} {b}"
    meta = {"prompt": rng.choice(("What is {}?", "Compute {}.")).format(expr) + " Reply with the number only.",
            "constraints": [{"type": "arithmetic", "value": answer, "expr": expr}], "topic": "arithmetic",
            "split": split}
    rejected = rng.choice((f"The answer is {answer}.", f"{expr} = {answer}", str(answer + rng.choice((-2, -1, 1, 10)))))
    return meta, str(answer), rejected


def sample_example(rng: random.Random, split: str, hard: bool = False) -> tuple[dict, str, str]:
    """One task from `split` ("train" or "eval"): (meta, chosen demonstration, rejected response)."""
    if rng.random() < 0.1:
        return _arithmetic_task(rng, split)
    while (out := _text_task(rng, split, hard)) is None:
        pass
    return out


def write_jsonl(path: str, rows: list[dict]):  # through a temporary file: readers never see half a file
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    os.replace(path + ".tmp", path)


def make(out: str, seed: int, n_sft=2000, n_prefs=2000, n_prompts=512, n_eval=200,
         hard_negatives: bool = False) -> dict[str, int]:
    """Write the five .jsonl files into `out` from `seed`; -> rows per file. hard_negatives: only rejected change."""
    os.makedirs(out, exist_ok=True)
    counts = {}
    for name, split, n in (("sft", "train", n_sft), ("prefs", "train", n_prefs), ("prompts", "train", n_prompts),
                           ("eval", "eval", n_eval), ("eval_prefs", "eval", n_eval)):
        rng, rows, seen = random.Random(f"{seed}/{name}"), [], set()  # str seeds hash with sha512: stable
        for _ in range(20 * n + 100):  # distinct prompts per file; bounded in case the pool runs dry
            if len(rows) == n:
                break
            meta, chosen, rejected = sample_example(rng, split, hard_negatives)
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
                rows.append({**meta, **({"reference": chosen} if name == "eval" else {}), "id": rid})
        write_jsonl(os.path.join(out, f"{name}.jsonl"), rows)
        counts[name] = len(rows)
    return counts


@dataclasses.dataclass
class MakeConfig:
    """Write the suite's sft, prefs, prompts, eval and eval_prefs .jsonl into --out, deterministically from --seed."""
    out: str = ""  # output directory
    seed: int = 0  # everything is a deterministic function of this seed
    n_sft: int = 2000  # SFT demonstrations
    n_prefs: int = 2000  # off-policy preference pairs
    n_prompts: int = 512  # PPO prompts
    n_eval: int = 200  # held-out eval prompts (unseen topics and keywords), and as many pairs in eval_prefs.jsonl
    hard_negatives: bool = False  # some rejected answers in an unrequested format, or longer (answers.hard_negative)


def make_main(cfg: MakeConfig) -> dict[str, int]:
    cli.check(cfg.out != "", "--out is required")
    cli.check(not os.path.exists(cfg.out) or os.path.isdir(cfg.out), f"--out {cfg.out}: not a directory")
    for f in ("n_sft", "n_prefs", "n_prompts", "n_eval"):
        cli.check(getattr(cfg, f) >= 0, f"--{f.replace('_', '-')} must be >= 0, got {getattr(cfg, f)}")
    counts = make(cfg.out, cfg.seed, cfg.n_sft, cfg.n_prefs, cfg.n_prompts, cfg.n_eval, cfg.hard_negatives)
    print("\n".join(f"wrote {k} rows to {os.path.join(cfg.out, name + '.jsonl')}" for name, k in counts.items()))
    return counts


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["make"]:
        return cli.run(make_main, MakeConfig, argv[1:], prog="python -m nanoalign.tasks make")
    if argv[:1] == ["pairs"]:
        from .pairs import PairsConfig, pairs_main  # pairs.py imports this module
        return cli.run(pairs_main, PairsConfig, argv[1:], prog="python -m nanoalign.tasks pairs")
    if argv[:1] not in (["-h"], ["--help"]):
        print(f"error: usage: {USAGE}", file=sys.stderr)
        sys.exit(2)
    print(f"usage: {USAGE}\n\n{__doc__.strip()}")


if __name__ == "__main__":
    main()
