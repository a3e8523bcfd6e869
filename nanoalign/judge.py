"""The task suite's gold judge: a program checks each constraint of a response (IFEval style).

The gold score of a response is the fraction of its row's constraints it satisfies, each format nobody asked for
(FORMATS) counting as one more constraint failed; an empty or degenerate response scores 0. The constraints live in
the row itself (nanoalign/tasks.py writes them), so `score(response, row)` needs nothing else. The judge checks form,
not truth (except for arithmetic).
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


def bullet_lines(r, marks="-"):
    return sum(re.match(rf"[ \t]*[{marks}] +\S", line) is not None for line in r.splitlines())


def check_quotes(c, r):
    s = r.strip()
    return len(s) >= 2 and (s[0], s[-1]) in (('"', '"'), ("“", "”"))


def json_object(r) -> dict | None:
    s = r.strip()
    fenced = re.fullmatch(r"```[\w-]*\s*(.*?)\s*```", s, re.DOTALL)  # ```json ... ```
    try:
        obj = json.loads(fenced.group(1) if fenced else s)
    except ValueError:
        return None
    return obj if isinstance(obj, dict) else None


def check_arithmetic(c, r):  # the number only; a trailing period and a Unicode minus are tolerated
    s = r.strip().rstrip(".").strip().replace("\u2212", "-")
    return re.fullmatch(r"[-+]?\d+(\.\d+)?", s) is not None and float(s) == c["value"]


# one checker per constraint family, in the order the task generator draws them from (a new order: new data)
CHECKS = {"case": check_case, "keyword": lambda c, r: has_word(c["value"], r),
          "avoid": lambda c, r: not has_word(c["value"], r), "no_commas": lambda c, r: "," not in r and "，" not in r,
          "start": lambda c, r: r.lstrip().startswith(c["value"]), "end": lambda c, r: r.rstrip().endswith(c["value"]),
          "word_limit": check_word_limit, "bullets": lambda c, r: bullet_lines(r) == c["value"], "quotes": check_quotes,
          "json": lambda c, r: c["value"] in (json_object(r) or {}), "arithmetic": check_arithmetic}
FAMILIES = tuple(CHECKS)


def _prose(r):  # where case is judged: 3 words or more (not a lone name or number), and not a JSON object
    return len(words(r)) >= 3 and json_object(r) is None


# Formats a prompt may not have asked for: name -> (detector, the families that ask for it or make it natural). Each
# one found counts as a failed constraint: else an answer loses nothing by putting a format on, and a reward model
# learns "format = good" from pairs where a format only ever appears on the chosen side.
FORMATS = {"quotes": (lambda r: check_quotes(None, r), {"quotes"}),
           "bullets": (lambda r: bullet_lines(r, "-*•") > 0, {"bullets"}),
           "capitals": (lambda r: _prose(r) and check_case({"value": "upper"}, r), {"case", "json"}),
           "json": (lambda r: json_object(r) is not None, {"json"}),
           "lowercase": (lambda r: _prose(r) and check_case({"value": "lower"}, r), {"case", "arithmetic", "json"})}


def unrequested(response: str, meta: dict) -> list[str]:
    """The formats of `response` that its prompt did not ask for (FORMATS)."""
    asked = {c["type"] for c in meta["constraints"]}
    return [name for name, (has, natural) in FORMATS.items() if not asked & natural and has(response)]


def check(constraint: dict, response: str) -> bool:
    if constraint["type"] not in CHECKS:
        raise ValueError(f"unknown constraint type {constraint['type']!r}")
    return CHECKS[constraint["type"]](constraint, response)


def is_degenerate(response: str, meta: dict) -> bool:
    """Empty, under 3 words where prose is expected (the required start and end phrases not counted: an answer that
    is only "Hope this helps." would get the avoid, no-commas and word-limit constraints free), the prompt repeated
    back, a sentence said twice, or one phrase looped (repetition: Holtzman et al. 2020)."""
    p = meta.get("prompt") or meta.get("messages") or ""  # a string, or the messages a reader turned it into
    p = p if isinstance(p, str) else " ".join(m["content"] for m in p if m.get("role") == "user")
    ws, prompt = [w.lower() for w in words(response)], " ".join(w.lower() for w in words(p))
    prose = not {c["type"] for c in meta["constraints"]} & {"arithmetic", "json"}
    said = response
    for c in (c for c in meta["constraints"] if c["type"] in ("start", "end")):
        said = re.sub(re.escape(c["value"]), " ", said, count=1, flags=re.IGNORECASE)
    sentences = [" ".join(words(x)).lower() for x in re.split(r"[.!?][\"”'}]*\s+", response)]
    sentences = [x for x in sentences if x.count(" ") >= 2]  # 3 words or more
    return (not response.strip() or (prose and len(words(said)) < 3)
            or (prompt != "" and f" {prompt} " in f" {' '.join(ws)} ") or len(set(sentences)) < len(sentences)
            or (len(ws) >= 12 and len(set(ws)) < 0.3 * len(ws)))


def score(response: str, meta: dict) -> float:
    """Gold score in [0, 1]: satisfied / (constraints + unrequested formats), 0 if degenerate."""
    cons = meta["constraints"]
    if is_degenerate(response, meta):
        return 0.0
    return sum(check(c, response) for c in cons) / (len(cons) + len(unrequested(response, meta)))


def check_rows(rows: list[dict], path: str, need_all: bool = True):
    """Check the judge's metadata once, up front, so that a bad row is `FILE:LINE: ...` (a UserError) and not a
    crash after minutes of sampling. need_all: every row must have it (the gold judge); else only rows that do."""
    for r in rows:
        if need_all or "constraints" in r:
            try:
                score("Probe answer text.", r)  # no format of its own: no constraints is 0/0, an error
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


def unrequested_rates(responses: list[str], metas: list[dict]) -> dict:
    """The fraction of responses with any unrequested format, and per format the fraction of the responses whose
    prompt did not ask for it (formats no prompt left out are not reported)."""
    flags = [unrequested(r, m) for r, m in zip(responses, metas, strict=True)]
    free = {f: [fl for fl, m in zip(flags, metas) if not natural & {c["type"] for c in m["constraints"]}]
            for f, (_, natural) in FORMATS.items()}
    return {"unrequested_rate": sum(map(bool, flags)) / len(flags),
            "unrequested_by_format": {f: sum(f in fl for fl in fls) / len(fls) for f, fls in free.items() if fls}}
