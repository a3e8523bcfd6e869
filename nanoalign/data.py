"""JSONL readers with validation (TRL conventions), and collation.

Every bad row is reported as one line `FILE:LINE: what is wrong` (a UserError -> exit code 2). Every reader returns
rows normalised to message lists, so the scripts need to handle only one shape:
- SFT:          {"messages": [...]}                                   (prompt/completion rows are converted)
- preferences:  {"prompt": [...], "chosen": [...], "rejected": [...]}  (chosen/rejected are the assistant turns)
- unpaired:     {"prompt": [...], "completion": [...], "label": bool}
- prompts:      {"prompt": str or [...], ...}                          (extra keys, e.g. task metadata, are kept)
"""
import json
import os

from .cli import UserError

ROLES = ("system", "user", "assistant")


def read_jsonl(path: str) -> list[tuple[int, dict]]:
    """(line number, object) for each non-blank line; any malformed input is a UserError naming FILE:LINE."""
    if not path:
        raise UserError("no data file given")
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such file")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: not valid UTF-8 (byte {raw[e.start]:#04x})")
    if not text.strip():
        raise UserError(f"{path}: empty file")
    if text.lstrip().startswith("["):
        raise UserError(f"{path}:1: a JSON array; expected JSONL (one JSON object per line)")
    lines = text.split("\n")
    rows = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            last = i == len(lines) and not text.endswith("\n")
            what = "truncated last line" if last and e.pos >= len(line.rstrip()) else "malformed JSON"
            raise UserError(f"{path}:{i}: {what} ({e.msg} at column {e.colno})")
        if not isinstance(obj, dict):
            raise UserError(f"{path}:{i}: expected a JSON object, got {type(obj).__name__}")
        rows.append((i, obj))
    return rows


def check_messages(msgs, where: str, field: str, need_assistant: bool = False) -> list[dict]:
    if not isinstance(msgs, list) or not msgs:
        raise UserError(f"{where}: '{field}' must be a non-empty list of messages")
    for m in msgs:
        if not isinstance(m, dict):
            raise UserError(f"{where}: '{field}' holds a {type(m).__name__}, expected a message object")
        if "role" not in m or "content" not in m:
            raise UserError(f"{where}: a message in '{field}' lacks 'role' or 'content'")
        if m["role"] not in ROLES:
            raise UserError(f"{where}: unknown role {m['role']!r} in '{field}' (expected one of {', '.join(ROLES)})")
        if not isinstance(m["content"], str):
            raise UserError(f"{where}: message content in '{field}' must be a string")
    if need_assistant and not any(m["role"] == "assistant" for m in msgs):
        raise UserError(f"{where}: '{field}' has no assistant turn")
    return [{"role": m["role"], "content": m["content"]} for m in msgs]


def _prompt(row, where) -> list[dict]:
    p = row.get("prompt")
    if isinstance(p, str):
        return [{"role": "user", "content": p}]
    if isinstance(p, list):
        return check_messages(p, where, "prompt")
    raise UserError(f"{where}: missing field 'prompt'" if p is None else f"{where}: 'prompt' must be a string or "
                    f"a list of messages, got {type(p).__name__}")


def _response(row, key, where) -> list[dict]:
    v = row.get(key)
    if isinstance(v, str):
        return [{"role": "assistant", "content": v}]
    if isinstance(v, list):
        return check_messages(v, where, key, need_assistant=True)
    raise UserError(f"{where}: missing field '{key}'" if v is None else f"{where}: '{key}' must be a string or a "
                    f"list of messages, got {type(v).__name__}")


def _meta(row, drop) -> dict:
    return {k: v for k, v in row.items() if k not in drop}


def read_sft(path: str) -> list[dict]:
    out = []
    for i, row in read_jsonl(path):
        where = f"{path}:{i}"
        if "messages" in row:
            msgs = check_messages(row["messages"], where, "messages", need_assistant=True)
        elif "prompt" in row and "completion" in row:
            msgs = _prompt(row, where) + _response(row, "completion", where)
        elif "chosen" in row:
            raise UserError(f"{where}: missing field 'messages' (this looks like a preference file; use train_dpo.py"
                            " or train_rm.py)")
        else:
            raise UserError(f"{where}: missing field 'messages' (or 'prompt' and 'completion')")
        out.append({"messages": msgs, **_meta(row, ("messages", "prompt", "completion")), "line": i})
    return out


def read_prefs(path: str) -> list[dict]:
    out = []
    for i, row in read_jsonl(path):
        where = f"{path}:{i}"
        if "chosen" not in row or "rejected" not in row:
            raise UserError(f"{where}: missing field '{'chosen' if 'chosen' not in row else 'rejected'}' (expected a "
                            "preference row: prompt, chosen, rejected)")
        if "prompt" in row:
            prompt, chosen, rejected = _prompt(row, where), _response(row, "chosen", where), _response(row, "rejected", where)
        else:  # HH style: full conversations; the shared prefix is the prompt
            c = check_messages(row["chosen"], where, "chosen", need_assistant=True)
            r = check_messages(row["rejected"], where, "rejected", need_assistant=True)
            n = 0
            while n < min(len(c), len(r)) - 1 and c[n] == r[n]:
                n += 1
            if n == 0:
                raise UserError(f"{where}: 'chosen' and 'rejected' share no prompt turns")
            prompt, chosen, rejected = c[:n], c[n:], r[n:]
        out.append({"prompt": prompt, "chosen": chosen, "rejected": rejected,
                    **_meta(row, ("prompt", "chosen", "rejected")), "line": i})
    return out


def read_unpaired(path: str) -> list[dict]:
    out = []
    for i, row in read_jsonl(path):
        where = f"{path}:{i}"
        if not isinstance(row.get("label"), bool):
            raise UserError(f"{where}: missing field 'label'" if "label" not in row else f"{where}: 'label' must be "
                            "true or false")
        out.append({"prompt": _prompt(row, where), "completion": _response(row, "completion", where),
                    "label": row["label"], **_meta(row, ("prompt", "completion", "label")), "line": i})
    return out


def read_prompts(path: str) -> list[dict]:
    out = []
    for i, row in read_jsonl(path):
        _prompt(row, f"{path}:{i}")  # validates
        out.append({**row, "line": i})
    return out


def pairs_to_unpaired(rows: list[dict]) -> list[dict]:
    """Split preference pairs into KTO's unpaired rows: chosen -> label true, rejected -> label false."""
    out = []
    for r in rows:
        out.append({"prompt": r["prompt"], "completion": r["chosen"], "label": True, "line": r.get("line")})
        out.append({"prompt": r["prompt"], "completion": r["rejected"], "label": False, "line": r.get("line")})
    return out
