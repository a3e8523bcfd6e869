"""The verifiable task suite and its gold judge (IFEval-style: a program, not a person, is the judge).

A prompt is a plain request about a topic plus one to three constraints a program can check, e.g.
    Describe tea. Write your whole answer in lowercase letters. Include the word "calm".
The gold score of a response is the fraction of its constraints satisfied; an empty or degenerate response scores 0.
From one seed, `make` writes SFT demonstrations, off-policy preference pairs (chosen = demonstration, rejected = the
same answer with one or more constraints broken), PPO prompts, and a held-out eval split whose topics and keywords
are disjoint from training:

    python -m nanoalign.tasks make --out data/ --seed 0 [--n-sft 2000 --n-prefs 2000 --n-prompts 512 --n-eval 200]

From a model, `pairs` makes on-policy preference pairs, UltraFeedback style (k samples, judged; best vs worst):

    python -m nanoalign.tasks pairs --model M --prompts data/prompts.jsonl --k 4 --out pairs.jsonl \
        [--judge gold|RM_DIR] [--label-noise T] [--temperature 1.0] [--max-new-tokens 96] [--seed S] [--limit N]

Every row carries its metadata, so `score(response, row)` needs nothing else:
    {"prompt": str, "constraints": [{"type": FAMILY, "value": ...}, ...], "topic": str, "split": "train"|"eval",
     "id": str}   (word_limit adds "relation": "at_most"|"at_least"; arithmetic adds "expr": "7 + 5")
Simplifications: one phrasing per constraint, answers built from a small hand-written sentence bank, and the judge
checks form, not truth (except for arithmetic).
"""
import dataclasses
import json
import math
import os
import random
import re
import sys

from . import cli

FAMILIES = ("case", "keyword", "avoid", "no_commas", "start", "end", "word_limit", "bullets", "quotes", "json",
            "arithmetic")
TEXT_FAMILIES = FAMILIES[:-1]  # arithmetic always stands alone
# pairs that cannot hold at once: a bulleted answer is not one quoted string, JSON cannot begin with a phrase, ...
CONFLICTS = {frozenset(p) for p in [("bullets", "quotes"), ("bullets", "json"), ("quotes", "json"),
                                    ("bullets", "start"), ("bullets", "end"), ("quotes", "start"), ("quotes", "end"),
                                    ("json", "start"), ("json", "end"), ("json", "word_limit")]}

# ---------------------------------------------------------------------------------------------------- the judge
_WORD = re.compile(r"\w+(?:['’]\w+)*")  # Unicode-aware; "- ", quotes and JSON braces are not words


def words(text: str) -> list[str]:
    return _WORD.findall(text)


def _has_word(word: str, text: str) -> bool:
    return re.search(rf"(?<!\w){re.escape(word)}(?!\w)", text, re.IGNORECASE) is not None


def check_case(c, r):  # letters only; letters without case (digits, CJK) are ignored
    letters = [ch for ch in r if ch.isalpha()]
    wrong = str.isupper if c["value"] == "lower" else str.islower
    return bool(letters) and not any(wrong(ch) for ch in letters)


def check_keyword(c, r):
    return _has_word(c["value"], r)


def check_avoid(c, r):
    return not _has_word(c["value"], r)


def check_no_commas(c, r):
    return "," not in r and "，" not in r


def check_start(c, r):
    return r.lstrip().startswith(c["value"])


def check_end(c, r):
    return r.rstrip().endswith(c["value"])


def check_word_limit(c, r):
    n = len(words(r))
    return n <= c["value"] if c["relation"] == "at_most" else n >= c["value"]


def check_bullets(c, r):
    return sum(re.match(r"[ \t]*- +\S", line) is not None for line in r.splitlines()) == c["value"]


def check_quotes(c, r):
    s = r.strip()
    return len(s) >= 2 and (s[0], s[-1]) in (('"', '"'), ("“", "”"))


def check_json(c, r):
    s = r.strip()
    fenced = re.fullmatch(r"```[\w-]*\s*(.*?)\s*```", s, re.DOTALL)  # ```json ... ```
    try:
        obj = json.loads(fenced.group(1) if fenced else s)
    except ValueError:
        return False
    return isinstance(obj, dict) and c["value"] in obj


def check_arithmetic(c, r):  # the number only; a trailing period and a Unicode minus are tolerated
    s = r.strip().rstrip(".").strip().replace("\u2212", "-")
    return re.fullmatch(r"[-+]?\d+(\.\d+)?", s) is not None and float(s) == c["value"]


CHECKS = {f: globals()[f"check_{f}"] for f in FAMILIES}


def check(constraint: dict, response: str) -> bool:
    if constraint["type"] not in CHECKS:
        raise ValueError(f"unknown constraint type {constraint['type']!r}")
    return CHECKS[constraint["type"]](constraint, response)


def _prompt_text(meta: dict) -> str:  # prompt rows hold a string; readers may have turned it into messages
    p = meta.get("prompt") or meta.get("messages") or ""
    return p if isinstance(p, str) else " ".join(m["content"] for m in p if m.get("role") == "user")


def is_degenerate(response: str, meta: dict) -> bool:
    """Empty, under 3 words where prose is expected, the prompt repeated back, or one phrase looped."""
    ws = [w.lower() for w in words(response)]
    prompt = " ".join(w.lower() for w in words(_prompt_text(meta)))
    prose = not {c["type"] for c in meta["constraints"]} & {"arithmetic", "json"}
    return (not response.strip() or (prose and len(ws) < 3)
            or (prompt != "" and f" {prompt} " in f" {' '.join(ws)} ")
            or (len(ws) >= 12 and len(set(ws)) < 0.3 * len(ws)))


def score(response: str, meta: dict) -> float:
    """Gold score in [0, 1]: the fraction of meta["constraints"] that `response` satisfies (0 if degenerate)."""
    cons = meta["constraints"]
    if is_degenerate(response, meta):
        return 0.0
    return sum(check(c, response) for c in cons) / len(cons)


def check_rows(rows: list[dict], path: str, need_all: bool = True):
    """Check the judge's metadata once, up front, so that a bad row is `FILE:LINE: ...` (a UserError) and not a
    crash after minutes of sampling. need_all: every row must have it (the gold judge); else only rows that do."""
    for r in rows:
        if need_all or "constraints" in r:
            try:
                score("probe answer text", r)
            except Exception as e:  # the checkers index into the metadata: any error means it is malformed
                raise cli.UserError(f"{path}:{r.get('line', '?')}: task metadata the gold judge cannot use "
                                    f"({type(e).__name__}: {e}); the gold judge needs 'constraints' on every row")


def score_by_family(responses: list[str], metas: list[dict]) -> dict[str, float]:
    """Per family, the fraction of its constraints satisfied across all rows (degenerate responses fail all)."""
    hits, totals = {}, {}
    for r, meta in zip(responses, metas, strict=True):
        bad = is_degenerate(r, meta)
        for c in meta["constraints"]:
            totals[c["type"]] = totals.get(c["type"], 0) + 1
            hits[c["type"]] = hits.get(c["type"], 0) + (not bad and check(c, r))
    return {f: hits[f] / totals[f] for f in sorted(totals)}


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
    return {"train": [n for i, n in enumerate(names) if i % every != every - 1],
            "eval": [n for i, n in enumerate(names) if i % every == every - 1]}


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
            "end": f'End your answer with the exact phrase "{v}"',
            "word_limit": f"Use at {'most' if c.get('relation') == 'at_most' else 'least'} {v} words.",
            "bullets": f'Answer with exactly {v} bullet points that start with "- ".',
            "quotes": "Wrap your whole answer in double quotes.",
            "json": f'Answer with a JSON object that has the key "{v}".'}[t]


def _render(plan: dict, body: list[str], broken=frozenset()) -> str:
    """Turn base sentences into a response that satisfies every constraint except those in `broken`."""
    c = {x["type"]: x["value"] for x in plan["constraints"]}
    body = list(body)
    if "avoid" in broken:  # slip in the sentence that uses the word, keeping the number of sentences
        body = body[:-1] + [plan["avoid_sentence"]] if len(body) > 1 else body + [plan["avoid_sentence"]]
    if "bullets" in broken and len(body) == c["bullets"]:
        body = body[:-1]  # one bullet short (a cut-down body may already be short)
    if "keyword" in c and "keyword" not in broken:
        body[-1] += " " + plan["keyword_sentence"]
    if "no_commas" in c and "no_commas" not in broken:
        body = [s.replace(",", "") for s in body]
    elif "no_commas" in broken and not any("," in s for s in body):
        body[0] = "Well, " + body[0][0].lower() + body[0][1:]
    pieces = body if "bullets" in c else [" ".join(body)]
    if "start" in c and "start" not in broken:
        pieces[0] = c["start"] + " " + pieces[0]
    if "end" in c and "end" not in broken:
        pieces[-1] += " " + c["end"]
    if "case" in c and "case" not in broken:
        pieces = [p.lower() if c["case"] == "lower" else p.upper() for p in pieces]
    if "bullets" in c:
        return "\n".join("- " + p for p in pieces)
    text = pieces[0]
    if "quotes" in c and "quotes" not in broken:
        text = f'"{text}"'
    if "json" in c and "json" not in broken:
        text = json.dumps({c["json"]: text}, ensure_ascii=False)
    return text


def _break_length(plan: dict, limit: dict, broken) -> list[str]:
    """Base sentences whose rendering violates the word limit: more sentences, or one short cut-down sentence."""
    body = plan["body"]
    if limit["relation"] == "at_most":
        more = plan["extras"] + body
        tries = [body + more[:j] for j in range(1, len(more) + 1)]
    else:
        ws = min(body, key=lambda s: len(words(s))).rstrip(".").split()
        tries = [[" ".join(ws[:m]) + "."] for m in range(len(ws), 2, -1)]
    return next((b for b in tries if not check(limit, _render(plan, b, broken))), tries[-1])


def _reject(rng: random.Random, plan: dict, meta: dict, chosen: str) -> str:
    """A plausible response that breaks at least one constraint: usually one, sometimes all (the raw base text)."""
    fams = [c["type"] for c in meta["constraints"]]
    attempts = ([set(fams)] if rng.random() < 0.25 else []) + [{f} for f in rng.sample(fams, len(fams))] + [set(fams)]
    limit = next((c for c in meta["constraints"] if c["type"] == "word_limit"), None)
    for broken in attempts:
        body = _break_length(plan, limit, broken) if "word_limit" in broken else plan["body"]
        text = _render(plan, body, broken)
        if text != chosen and score(text, meta) < 1:
            return text
    raise AssertionError(f"no constraint of {meta['prompt']!r} can be broken")


def _text_task(rng: random.Random, split: str):
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
    n = (rng.randint(2, 3 if "avoid" in fams else 4) if "bullets" in fams
         else rng.randint(2, 3) if "word_limit" in fams and relation == "at_least" else rng.randint(1, 2))
    v["bullets"] = n
    pool_words = set(re.findall(r"[a-z]+", " ".join(pool).lower()))
    keywords = [k for k in KEYWORD_SPLIT[split] if k not in pool_words]
    v["keyword"], kw_sentence = rng.choice(keywords), rng.choice(KEYWORD_SENTENCES)
    body, avoid_sentence = pool[:n], None
    if "avoid" in fams:  # a content word the natural answer would use, with enough sentences left without it
        banned = _NEVER_AVOID | set(topic.split()) | (TRAIN_VOCAB if split == "eval" else set())
        usable = lambda w: (w not in banned and sum(not _has_word(w, s) for s in pool) >= n
                            and not (is_tip and _has_word(w, tip)))  # a tip request keeps its tip
        cands = sorted({w for s in pool[:n + is_tip] for w in re.findall(r"[a-z]{4,}", s.lower()) if usable(w)})
        cands = cands or sorted({w for w in pool_words if len(w) >= 4 and usable(w)})
        if not cands:
            return None
        v["avoid"] = rng.choice(cands)
        body = [s for s in pool if not _has_word(v["avoid"], s)][:n]
        avoid_sentence = next(s for s in pool if _has_word(v["avoid"], s))
    cons = [{"type": f, "value": v.get(f)} for f in fams]
    plan = {"constraints": cons, "body": body, "extras": [s for s in pool if s not in body],
            "avoid_sentence": avoid_sentence, "keyword_sentence": kw_sentence.format(v["keyword"])}
    chosen = _render(plan, body)
    for c in cons:  # the limit is set from the demonstration, rounded to a multiple of 5 on the safe side
        if c["type"] == "word_limit":
            wc = len(words(chosen))
            c["relation"] = relation
            c["value"] = -(-wc // 5) * 5 + rng.choice((0, 5)) if relation == "at_most" else max(5, wc // 5 * 5)
    meta = {"prompt": request + " " + " ".join(describe(c) for c in cons), "constraints": cons, "topic": topic,
            "split": split}
    return meta, chosen, _reject(rng, plan, meta, chosen)


def _arith_split(a: int, op: str, b: int) -> str:  # fixed, so eval problems never appear in training
    return "eval" if (7 * a + 3 * b + "+-*".index(op)) % 5 == 0 else "train"


def _arithmetic_task(rng: random.Random, split: str):
    while True:
        op = rng.choice("+-*")
        a, b = (rng.randint(2, 12), rng.randint(2, 12)) if op == "*" else (rng.randint(2, 40), rng.randint(2, 40))
        a, b = (max(a, b), min(a, b)) if op == "-" else (a, b)  # no negative answers
        if _arith_split(a, op, b) == split:
            break
    answer, expr = (a + b if op == "+" else a - b if op == "-" else a * b), f"{a} {op} {b}"
    meta = {"prompt": rng.choice(("What is {}?", "Compute {}.")).format(expr) + " Reply with the number only.",
            "constraints": [{"type": "arithmetic", "value": answer, "expr": expr}], "topic": "arithmetic",
            "split": split}
    rejected = rng.choice((f"The answer is {answer}.", f"{expr} = {answer}", str(answer + rng.choice((-2, -1, 1, 10)))))
    return meta, str(answer), rejected


def sample_example(rng: random.Random, split: str) -> tuple[dict, str, str]:
    """One task from `split` ("train" or "eval"): (meta, chosen demonstration, rejected response)."""
    if rng.random() < 0.1:
        return _arithmetic_task(rng, split)
    while (out := _text_task(rng, split)) is None:
        pass
    return out


# ------------------------------------------------------------------------------------------------------- files
def _write_jsonl(path: str, rows: list[dict]):
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    os.replace(tmp, path)  # readers never see half a file


def make(out: str, seed: int, n_sft=2000, n_prefs=2000, n_prompts=512, n_eval=200) -> dict[str, int]:
    """Write sft/prefs/prompts/eval/eval_prefs .jsonl into `out`, deterministically from `seed`; returns rows per file."""
    os.makedirs(out, exist_ok=True)
    counts = {}
    for name, split, n in (("sft", "train", n_sft), ("prefs", "train", n_prefs), ("prompts", "train", n_prompts),
                           ("eval", "eval", n_eval), ("eval_prefs", "eval", n_eval)):
        rng, rows, seen = random.Random(f"{seed}/{name}"), [], set()  # str seeds hash with sha512: stable
        for _ in range(20 * n + 100):  # distinct prompts per file; bounded in case the pool runs dry
            if len(rows) == n:
                break
            meta, chosen, rejected = sample_example(rng, split)
            if meta["prompt"] in seen:
                continue
            seen.add(meta["prompt"])
            rid, rest = f"{name}-{len(rows)}", {k: meta[k] for k in ("constraints", "topic", "split")}
            if name == "sft":
                turns = [{"role": "user", "content": meta["prompt"]}, {"role": "assistant", "content": chosen}]
                rows.append({"messages": turns, **rest, "id": rid})
            elif name in ("prefs", "eval_prefs"):  # eval_prefs: held-out pairs for RM / DPO accuracy
                rows.append({"prompt": meta["prompt"], "chosen": chosen, "rejected": rejected, **rest, "id": rid})
            else:  # prompts for PPO; eval rows also keep the demonstration as a reference answer
                rows.append({**meta, **({"reference": chosen} if name == "eval" else {}), "id": rid})
        _write_jsonl(os.path.join(out, f"{name}.jsonl"), rows)
        counts[name] = len(rows)
    return counts


# ---------------------------------------------------------------------------------------- on-policy pairs
def best_vs_worst(rows: list[dict], texts: list[str], scores: list[float], k: int, label_noise: float = 0.0,
                  seed: int = 0) -> tuple[list[dict], dict]:
    """UltraFeedback-style pairs from k judged completions per row (prompt-major): best is chosen, worst rejected.

    A tie (best score == worst score, or the same text) carries no preference and is dropped. With label_noise T > 0,
    each pair is flipped with the Bradley-Terry probability 1 - sigmoid((s_best - s_worst) / T): annotators who
    disagree more often the closer the two responses are (T -> inf: a coin flip; T = 0: never).
    """
    rng, pairs, ties, flipped = random.Random(f"{seed}/label-noise"), [], 0, 0
    for i, row in enumerate(rows):
        group = list(zip(scores[i * k:(i + 1) * k], texts[i * k:(i + 1) * k]))
        (hi, best), (lo, worst) = max(group, key=lambda g: g[0]), min(group, key=lambda g: g[0])
        if hi == lo or best == worst:
            ties += 1
            continue
        flip = label_noise > 0 and rng.random() < 1 - 1 / (1 + math.exp(-(hi - lo) / label_noise))
        flipped += flip
        (c, sc), (r, sr) = ((worst, lo), (best, hi)) if flip else ((best, hi), (worst, lo))
        meta = {key: v for key, v in row.items() if key not in ("prompt", "line", "reference")}
        pairs.append({"prompt": row["prompt"], "chosen": c, "rejected": r, **meta, "chosen_score": sc,
                      "rejected_score": sr})
    return pairs, {"pairs": len(pairs), "ties": ties, "flipped": flipped, "prompts": len(rows)}


@dataclasses.dataclass
class PairsConfig:
    model: str = ""  # policy to sample from (preset, alias, checkpoint dir, .gguf)
    prompts: str = ""  # prompts JSONL (with task metadata for the gold judge)
    out: str = ""  # output preference JSONL: prompt, chosen, rejected, the prompt's metadata, both scores
    k: int = 4  # completions sampled per prompt
    temperature: float = 1.0  # sampling temperature (> 0: k greedy samples would be identical)
    max_new_tokens: int = 96  # per completion
    seed: int = 0  # sampling and label-noise seed
    label_noise: float = 0.0  # Bradley-Terry temperature T of annotator noise (0 = clean labels)
    judge: str = "gold"  # gold, or a reward-model checkpoint dir
    limit: int = 0  # use only the first N prompts (0 = all)
    batch_size: int = 16  # generation batch
    device: str = "cpu"  # cpu or cuda
    bf16: bool = False  # sample from a bf16 copy of the weights (~1.35x faster decoding at batch 8 on this CPU)


def _pairs_main(cfg: PairsConfig) -> dict:
    from .data import read_prompts
    from .evaluate import make_judge, sample
    from .hub import load
    for f in ("model", "prompts", "out"):
        cli.check(getattr(cfg, f) != "", f"--{f} is required")
    cli.check(cfg.k >= 2, f"--k must be >= 2, got {cfg.k}")
    cli.check(cfg.temperature > 0, f"--temperature must be > 0, got {cfg.temperature}")
    cli.check(cfg.max_new_tokens > 0, f"--max-new-tokens must be > 0, got {cfg.max_new_tokens}")
    cli.check(cfg.label_noise >= 0, f"--label-noise must be >= 0, got {cfg.label_noise}")
    cli.check(cfg.limit >= 0 and cfg.batch_size > 0, "--limit must be >= 0 and --batch-size > 0")
    cli.check(not os.path.isdir(cfg.out), f"{cfg.out}: is a directory, not a file path")
    rows = read_prompts(cfg.prompts)[:cfg.limit or None]
    check_rows(rows, cfg.prompts, need_all=cfg.judge == "gold")
    judge = make_judge(cfg.judge, cfg.device)
    model, tok = load(cfg.model, cfg.device)
    samples = sample(model.eval(), tok, [r["prompt"] for r in rows], cfg.k, cfg.temperature, cfg.max_new_tokens,
                     cfg.seed, cfg.batch_size, cfg.bf16)
    texts = [s[2] for s in samples]
    scores = judge([r for r in rows for _ in range(cfg.k)], texts)
    pairs, stats = best_vs_worst(rows, texts, scores, cfg.k, cfg.label_noise, cfg.seed)
    cli.check(bool(pairs), f"{cfg.prompts}: no pairs left: all {len(rows)} prompts tied (every completion scored "
              "the same); try a higher --temperature or a larger --k")
    os.makedirs(os.path.dirname(cfg.out) or ".", exist_ok=True)
    _write_jsonl(cfg.out, pairs)
    print(f"wrote {len(pairs)} pairs to {cfg.out} ({stats['ties']} of {len(rows)} prompts dropped as ties; "
          f"{stats['flipped']} labels flipped by --label-noise {cfg.label_noise})")
    return stats


@dataclasses.dataclass
class MakeConfig:
    out: str = ""  # output directory for sft.jsonl, prefs.jsonl, prompts.jsonl, eval.jsonl
    seed: int = 0  # everything is a deterministic function of this seed
    n_sft: int = 2000  # SFT demonstrations
    n_prefs: int = 2000  # off-policy preference pairs
    n_prompts: int = 512  # PPO prompts
    n_eval: int = 200  # held-out eval prompts (disjoint topics and keywords)


def _make_main(cfg: MakeConfig) -> dict[str, int]:
    cli.check(cfg.out != "", "--out is required")
    cli.check(not os.path.exists(cfg.out) or os.path.isdir(cfg.out), f"--out {cfg.out}: not a directory")
    for f in ("n_sft", "n_prefs", "n_prompts", "n_eval"):
        cli.check(getattr(cfg, f) >= 0, f"--{f.replace('_', '-')} must be >= 0, got {getattr(cfg, f)}")
    counts = make(cfg.out, cfg.seed, cfg.n_sft, cfg.n_prefs, cfg.n_prompts, cfg.n_eval)
    for name, k in counts.items():
        print(f"wrote {k} rows to {os.path.join(cfg.out, name + '.jsonl')}")
    return counts


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in ("make", "pairs"):
        print("error: usage: python -m nanoalign.tasks make --out DIR [--seed S] ... | pairs --model M --prompts F "
              "--out F [--k 4] [--label-noise T] [--judge gold|RM_DIR] ...", file=sys.stderr)
        sys.exit(2)
    if argv[0] == "pairs":
        return cli.run(_pairs_main, PairsConfig, argv[1:])
    return cli.run(_make_main, MakeConfig, argv[1:])


if __name__ == "__main__":
    main()
