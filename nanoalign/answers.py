"""Answers to a task's plan (nanoalign.tasks): the demonstration, and rejected answers the gold judge scores below 1.

A plan holds the constraints, the answer's base sentences ("body"), the topic's other sentences ("extras"), and the
sentences that carry the keyword and the avoided word. render() satisfies every constraint but the broken ones.
"""
import json
import random
import re

from .judge import check, score, unrequested, words


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


# judge.FORMATS put on an answer: the counterfactual negatives below, and the rewrites nanoalign.probe shows an RM
MISFIRES = {"quotes": lambda s: f'"{s}"', "json": lambda s: json.dumps({"answer": s}),
            "capitals": str.upper, "lowercase": str.lower,
            "bullets": lambda s: "\n".join("- " + x for x in re.split(r"(?<=[.!?]) +", s) if x)}
FORMAT_FAMILIES = {"case", "quotes", "bullets", "json"}  # the constraints that ask for a format


def misfire(rng: random.Random, meta: dict, chosen: str, p: float = 0.4) -> str | None:
    """With probability p, `chosen` in a format its prompt did not ask for (one judge.unrequested flags). Quotes go
    first in half of these: the prompts quote the words and phrases they name (Include the word "calm"), so an opening
    quote is the format a model slips into unasked. Capitals go first in 30% and lowercase in 10%: the `case`
    demonstrations put both on the chosen side, where a reward model learns "capitals = asked for" unless it also
    sees them rejected."""
    if rng.random() < p:
        order = rng.sample(list(MISFIRES), len(MISFIRES))
        u = rng.random()
        for f in (["quotes"] if u < 0.5 else ["capitals"] if u < 0.8 else ["lowercase"] if u < 0.9 else []) + order:
            if f in unrequested(text := MISFIRES[f](chosen), meta):
                return text
    return None


def reject(rng: random.Random, plan: dict, meta: dict, chosen: str) -> str:
    """A plausible response that breaks one constraint, sometimes all; or a counterfactual: the demonstration in a
    format nobody asked for (misfire), or, in a third of the prompts that ask for a format, the format kept and other
    constraints broken. Else a format is only ever seen on the chosen side, and "format = good" is a shortcut a
    reward model learns instead of the constraints."""
    if text := misfire(rng, meta, chosen):
        return text
    fams = [c["type"] for c in meta["constraints"]]
    keep = FORMAT_FAMILIES.intersection(fams) if rng.random() < 1 / 3 else set()
    pool = [f for f in fams if f not in keep] or fams
    attempts = ([set(pool)] if rng.random() < 0.25 else []) + [{f} for f in rng.sample(pool, len(pool))] + [set(fams)]
    limit = next((c for c in meta["constraints"] if c["type"] == "word_limit"), None)
    for broken in attempts:
        text = render(plan, break_length(plan, limit, broken) if "word_limit" in broken else plan["body"], broken)
        if text != chosen and score(text, meta) < 1:
            return text
    raise AssertionError(f"no constraint of {meta['prompt']!r} can be broken")


def shortcut(meta: dict, chosen: str, rejected: str, p: float = 0.1) -> str:
    """In p of the prompts each, the rejected answer is instead the demonstration said twice, or only the start and end
    phrases the prompt asks for. The judge scores both 0 (degenerate); a reward model that never sees them rejected may
    pay for the length of one and for the constraints the other meets by saying nothing (avoid, no commas, a word limit
    at most), and PPO finds both. Seeded by the prompt: the other rows stay as they are."""
    u = random.Random(meta["prompt"]).random()
    phrases = [c["value"] for c in meta["constraints"] if c["type"] in ("start", "end")]
    if u < p:
        return chosen + ("\n" if "\n" in chosen else " ") + chosen
    return " ".join(phrases) if u < 2 * p and phrases else rejected
