"""Answers to a task's plan (nanoalign.tasks): the demonstration, and rejected answers that break constraints.

A plan holds the constraints, the answer's base sentences ("body"), the topic's other sentences ("extras"), and the
sentences that carry the keyword and the avoided word. render() satisfies every constraint but the broken ones.
"""
import json
import random

from .judge import check, score, words


def render(plan: dict, body: list[str], broken=frozenset()) -> str:
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
    text = "\n".join("- " + p for p in pieces) if "bullets" in c else pieces[0]  # bullets never come with quotes/json
    if "quotes" in c and "quotes" not in broken:
        text = f'"{text}"'
    if "json" in c and "json" not in broken:
        text = json.dumps({c["json"]: text}, ensure_ascii=False)
    return text


def break_length(plan: dict, limit: dict, broken) -> list[str]:
    """Base sentences whose rendering violates the word limit: more sentences, or one short cut-down sentence."""
    body = plan["body"]
    if limit["relation"] == "at_most":
        more = plan["extras"] + body
        tries = [body + more[:j] for j in range(1, len(more) + 1)]
    else:
        ws = min(body, key=lambda s: len(words(s))).rstrip(".").split()
        tries = [[" ".join(ws[:m]) + "."] for m in range(len(ws), 2, -1)]
    return next((b for b in tries if not check(limit, render(plan, b, broken))), tries[-1])


# formats nobody asked for: --hard-negatives puts them on the rejected side, nanoalign.probe shows them to an RM
MISFIRES = dict(quotes=lambda s: f'"{s}"', json=lambda s: json.dumps({"answer": s}), upper=str.upper, lower=str.lower)


def hard_negative(plan: dict, meta: dict, chosen: str, rejected: str, broken) -> str | None:
    """In a quarter of the pairs, the demonstration in a format the prompt did not ask for, where that breaks one it
    did ask for (quoted, it no longer begins with the required phrase); else, for a quarter of the rejected answers
    shorter than the demonstration, that answer with one more sentence. Otherwise a format is only ever seen on the
    chosen side, and chosen is usually the longer: shortcuts an RM learns instead of the constraints. The draws are
    seeded by the text, so every other row stays as it is."""
    rng, asked = random.Random(chosen), {c["type"] for c in meta["constraints"]}
    if rng.random() < 0.25:
        unasked = [f for f in MISFIRES if f not in asked and not (f in ("upper", "lower") and "case" in asked)]
        for f in rng.sample(unasked, len(unasked)):
            if (text := MISFIRES[f](chosen)) != chosen and score(text, meta) < 1:
                return text
    rng, extras = random.Random(rejected), [x for x in plan["extras"] if x != plan["avoid_sentence"]]
    if "word_limit" in broken or len(words(rejected)) >= len(words(chosen)) or not extras or rng.random() < 0.75:
        return None
    text = render(plan, plan["body"] + [rng.choice(extras)], broken)
    return text if text != chosen and score(text, meta) < 1 else None


def reject(rng: random.Random, plan: dict, meta: dict, chosen: str, hard: bool = False) -> str:
    """A plausible response that breaks one constraint, sometimes all; hard: some get a hard_negative instead."""
    fams = [c["type"] for c in meta["constraints"]]
    attempts = ([set(fams)] if rng.random() < 0.25 else []) + [{f} for f in rng.sample(fams, len(fams))] + [set(fams)]
    limit = next((c for c in meta["constraints"] if c["type"] == "word_limit"), None)
    for broken in attempts:
        text = render(plan, break_length(plan, limit, broken) if "word_limit" in broken else plan["body"], broken)
        if text != chosen and score(text, meta) < 1:
            return (hard and hard_negative(plan, meta, chosen, text, broken)) or text
    raise AssertionError(f"no constraint of {meta['prompt']!r} can be broken")
