"""The task suite's gold judge: a program checks each constraint of a response (IFEval style).

The gold score of a response is the fraction of its row's constraints it satisfies; an empty or degenerate response
scores 0. The constraints live in the row itself (see nanoalign/tasks.py, which writes them), so `score(response,
row)` needs nothing else. The judge checks form, not truth (except for arithmetic).
"""
import json
import re

from . import cli

_WORD = re.compile(r"\w+(?:['’]\w+)*")  # Unicode-aware; "- ", quotes and JSON braces are not words


def words(text: str) -> list[str]:
    return _WORD.findall(text)


def has_word(word: str, text: str) -> bool:
    return re.search(rf"(?<!\w){re.escape(word)}(?!\w)", text, re.IGNORECASE) is not None


def check_case(c, r):  # letters only; letters without case (digits, CJK) are ignored
    letters = [ch for ch in r if ch.isalpha()]
    wrong = str.isupper if c["value"] == "lower" else str.islower
    return bool(letters) and not any(wrong(ch) for ch in letters)


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


# one checker per constraint family, in the order the task generator draws them from (a new order: new data)
CHECKS = {"case": check_case, "keyword": lambda c, r: has_word(c["value"], r),
          "avoid": lambda c, r: not has_word(c["value"], r), "no_commas": lambda c, r: "," not in r and "，" not in r,
          "start": lambda c, r: r.lstrip().startswith(c["value"]), "end": lambda c, r: r.rstrip().endswith(c["value"]),
          "word_limit": check_word_limit, "bullets": check_bullets, "quotes": check_quotes, "json": check_json,
          "arithmetic": check_arithmetic}
FAMILIES = tuple(CHECKS)


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
