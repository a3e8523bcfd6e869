"""JSONL readers with validation (TRL conventions), the SFT and preference tokenizers, padding and batches.

A bad row is one line `FILE:LINE: what is wrong` (a UserError: exit code 2). Every reader returns rows as message
lists, so the scripts handle one shape each:
- SFT:          {"messages": [...]}                                   (prompt/completion rows are converted)
- preferences:  {"prompt": [...], "chosen": [...], "rejected": [...]}  (chosen/rejected are the assistant turns)
- unpaired:     {"prompt": [...], "completion": [...], "label": bool}
- prompts:      {"prompt": str or [...], ...}                          (extra keys, e.g. task metadata, are kept)
Padding is masked by position (attention_mask = 0), never by token id: SmolLM2's pad token is its EOS <|im_end|>,
which must stay in the loss. A preference response is tokenized inside its conversation: render_chat(prompt +
response), keeping the ids after the rendered prompt up to the last loss-masked token, so it ends with <|im_end|>, not
with the template's trailing "\n"; its mask is 1 on assistant tokens only. A row longer than max_len loses the end of
its response at collate time; a prompt that leaves no room makes it unusable. The prompt-shared layout of a pair,
[prompt | chosen | rejected] in one row, is packing.collate_shared.
"""
import json
import os
import sys
from collections import Counter

import torch

from .cli import UserError, check

ROLES = ("system", "user", "assistant")


def read_jsonl(path: str, flag: str = "--data") -> list[tuple[int, dict]]:
    """(line number, object) for each non-blank line; any malformed input is a UserError naming FILE:LINE."""
    check(bool(path), f"{flag} is required (no data file given)")
    check(not os.path.isdir(path), f"{path}: a directory, not a file")
    check(os.path.isfile(path), f"{path}: no such file")
    with open(path, "rb") as f:
        raw = f.read().removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte-order mark (Windows editors) is not an error
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: not valid UTF-8 (byte {raw[e.start]:#04x})")
    check(bool(text.strip()), f"{path}: empty file")
    blank = text[:len(text) - len(text.lstrip())].count("\n")  # blame the line an array opens on, after blank lines
    check(not text.lstrip().startswith("["), f"{path}:{blank + 1}: a JSON array; expected JSONL (one JSON object "
          "per line)")
    lines, rows = text.split("\n"), []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            if "\\u" in line:  # json accepts "\ud800", a lone UTF-16 surrogate: no text, and tokenizers reject it
                json.dumps(obj, ensure_ascii=False).encode("utf-8")
        except json.JSONDecodeError as e:
            cut = e.pos >= len(line.rstrip()) or e.msg.startswith("Unterminated string")  # the input ended early
            what = "truncated last line" if cut and i == len(lines) and not text.endswith("\n") else "malformed JSON"
            raise UserError(f"{path}:{i}: {what} ({e.msg} at column {e.colno})")
        except RecursionError:
            raise UserError(f"{path}:{i}: JSON nested too deeply")
        except UnicodeEncodeError:
            raise UserError(f"{path}:{i}: a \\u escape of a lone UTF-16 surrogate (not a Unicode character)")
        check(isinstance(obj, dict), f"{path}:{i}: expected a JSON object, got {type(obj).__name__}")
        rows.append((i, obj))
    return rows


def check_messages(msgs, where: str, field: str, need_assistant: bool = False) -> list[dict]:
    check(isinstance(msgs, list) and bool(msgs), f"{where}: '{field}' must be a non-empty list of messages")
    for m in msgs:
        check(isinstance(m, dict), f"{where}: '{field}' holds a {type(m).__name__}, expected a message object")
        check("role" in m and "content" in m, f"{where}: a message in '{field}' lacks 'role' or 'content'")
        check(m["role"] in ROLES, f"{where}: unknown role {m['role']!r} in '{field}' (expected one of "
              f"{', '.join(ROLES)})")
        check(isinstance(m["content"], str), f"{where}: message content in '{field}' must be a string")
    check(not need_assistant or any(m["role"] == "assistant" for m in msgs), f"{where}: '{field}' has no assistant "
          "turn")
    return [{"role": m["role"], "content": m["content"]} for m in msgs]


def _turns(row, key, where) -> list[dict]:
    """A prompt ("user" if a string) or a response ("assistant" if a string; a list must start with that turn)."""
    v, role = row.get(key), "user" if key == "prompt" else "assistant"
    check(isinstance(v, (str, list)), f"{where}: missing field '{key}'" if v is None else f"{where}: '{key}' must "
          f"be a string or a list of messages, got {type(v).__name__}")
    if isinstance(v, str):
        return [{"role": role, "content": v}]
    msgs = check_messages(v, where, key, need_assistant=role == "assistant")
    check(role == "user" or msgs[0]["role"] == "assistant", f"{where}: '{key}' must start with an assistant turn, "
          f"not a {msgs[0]['role']} turn")  # a response continues the prompt after `<|im_start|>assistant\n`
    return msgs


def read_sft(path: str, flag: str = "--data") -> list[dict]:
    out = []
    for i, row in read_jsonl(path, flag):
        where = f"{path}:{i}"
        if "messages" in row:
            msgs = check_messages(row["messages"], where, "messages", need_assistant=True)
        elif "prompt" in row and "completion" in row:
            msgs = _turns(row, "prompt", where) + _turns(row, "completion", where)
        else:
            raise UserError(f"{where}: missing field 'messages' (this looks like a preference file; use train_dpo.py"
                            " or train_rm.py)" if "chosen" in row else f"{where}: missing field 'completion' (an SFT "
                            "row is 'messages', or 'prompt' and 'completion')" if "prompt" in row else
                            f"{where}: missing field 'messages' (or 'prompt' and 'completion')")
        out.append({**row, "messages": msgs, "line": i})
    return out


def read_prefs(path: str, flag: str = "--data") -> list[dict]:
    out = []
    for i, row in read_jsonl(path, flag):
        where, missing = f"{path}:{i}", "chosen" if "chosen" not in row else "rejected"
        sft = " (this looks like an SFT file; use train_sft.py)" if "messages" in row or "completion" in row else ""
        check("chosen" in row and "rejected" in row, f"{where}: missing field '{missing}' (expected a preference "
              f"row: prompt, chosen, rejected){sft}")
        if "prompt" in row:
            prompt, chosen, rejected = (_turns(row, k, where) for k in ("prompt", "chosen", "rejected"))
        else:  # HH style: whole conversations, whose shared turns are the prompt
            c, r = (check_messages(row[k], where, k, need_assistant=True) for k in ("chosen", "rejected"))
            n = 0
            while n < min(len(c), len(r)) - 1 and c[n] == r[n]:
                n += 1
            while n > 0 and not c[n]["role"] == r[n]["role"] == "assistant":
                n -= 1  # the responses start at an assistant turn: back off to the last one they share
            check(n > 0, f"{where}: 'chosen' and 'rejected' share no prompt turns (before an assistant turn)")
            prompt, chosen, rejected = c[:n], c[n:], r[n:]
        out.append({**row, "prompt": prompt, "chosen": chosen, "rejected": rejected, "line": i})
    return out


def read_unpaired(path: str, flag: str = "--data") -> list[dict]:
    out = []
    for i, row in read_jsonl(path, flag):
        where = f"{path}:{i}"
        check(isinstance(row.get("label"), bool), f"{where}: missing field 'label'" if "label" not in row else
              f"{where}: 'label' must be true or false")
        out.append({**row, "prompt": _turns(row, "prompt", where), "completion": _turns(row, "completion", where),
                    "line": i})
    return out


def read_kto(path: str) -> list[dict]:
    """KTO's unpaired rows: read_unpaired's (a file with "label"), or preference pairs split into them (chosen:
    label true, rejected: label false)."""
    if "label" in read_jsonl(path)[0][1]:
        return read_unpaired(path)
    return [{"prompt": r["prompt"], "completion": r[k], "label": k == "chosen", "line": r["line"]}
            for r in read_prefs(path) for k in ("chosen", "rejected")]


def read_prompts(path: str, flag: str = "--prompts") -> list[dict]:
    rows = read_jsonl(path, flag)
    for i, row in rows:
        _turns(row, "prompt", f"{path}:{i}")  # validates
    return [{**row, "line": i} for i, row in rows]


def tokenize_sft(tok, rows: list[dict], max_len: int, train_on_prompt: bool = False, truncate: str = "drop",
                 path: str = "data", verbose: bool = True) -> list[tuple[list[int], list[int]]]:
    """read_sft rows -> [(ids, loss_mask)] of at most max_len tokens, loss_mask 1 on the tokens the model learns to
    predict: assistant content and its closing <|im_end|> (every token with train_on_prompt). A longer row is dropped,
    or with truncate="left" loses its oldest tokens if its last assistant turn still fits after one context token.
    Rows with nothing to train on are dropped too; drops are reported in one line, none usable is a UserError."""
    check(truncate in ("drop", "left"), f"--truncate must be drop or left, got {truncate!r}")
    out, too_long, empty = [], 0, 0
    for row in rows:
        ids, mask = tok.render_chat(row["messages"])
        if len(ids) > max_len:
            starts = [i for i in range(len(mask)) if mask[i] and (i == 0 or not mask[i - 1])]
            if truncate == "drop" or not starts or len(ids) - starts[-1] >= max_len:
                too_long += 1
                continue
            ids, mask = ids[-max_len:], mask[-max_len:]  # cut the oldest prompt tokens
        mask = [1] * len(ids) if train_on_prompt else list(mask)
        mask[0] = 0  # the first token has no context: it is never a target
        if not any(mask):
            empty += 1
            continue
        out.append((ids, mask))
    if (too_long or empty) and verbose:
        why = [f"{too_long} rows longer than --max-len {max_len}" + (" (--truncate left keeps those whose last "
               "answer fits)" if truncate == "drop" else "")] if too_long else []
        why += [f"{empty} rows with nothing to train on"] if empty else []
        print(f"{path}: dropped {' and '.join(why)}; {len(out)} of {len(rows)} rows left", file=sys.stderr)
    check(bool(out), f"{path}: no usable rows (of {len(rows)}: {too_long} longer than --max-len {max_len}, {empty} "
          "with nothing to train on)")
    return out


def tokenize_prefs(tok, rows: list[dict], max_len: int, path: str = "data", verbose: bool = True) -> list[dict]:
    """read_prefs or read_kto rows -> {"prompt", each response ("chosen" and "rejected", or "completion") and its
    "<response>_mask", "line"} (+ "label") as token ids. Drops (and reports) the rows whose prompt leaves no room
    under max_len, and pairs with chosen == rejected (nothing to learn: DPO's gradient would be exactly 0)."""
    kept, dropped = [], Counter()
    for r in rows:
        if "chosen" in r and r["chosen"] == r["rejected"]:
            dropped["with chosen == rejected"] += 1
            continue
        e = {"line": r.get("line"), **({"label": bool(r["label"])} if "label" in r else {})}
        e["prompt"] = p = tok.render_prompt(r["prompt"])
        for k in ("chosen", "rejected") if "chosen" in r else ("completion",):
            ids, mask = tok.render_chat(r["prompt"] + r[k])
            if ids[:len(p)] != p:  # a response that opens with spaces: BPE merges them with the header's "\n"
                ids, mask = tok.render_chat(r["prompt"] + r[k], apart=True)
            check(ids[:len(p)] == p, f"{path}:{r.get('line')}: the rendered prompt is not a prefix of the rendered "
                  "conversation")
            end = max(i for i, m in enumerate(mask) if m) + 1  # just past the last <|im_end|> in the loss
            e[k], e[k + "_mask"] = ids[len(p):end], mask[len(p):end]
        if len(e["prompt"]) >= max_len:
            dropped[f"with a prompt longer than --max-len {max_len}"] += 1
            continue
        kept.append(e)
    why = ", ".join(f"{n} {what}" for what, n in dropped.items())
    if why and verbose:
        print(f"{path}: dropped {why}; {len(kept)} of {len(rows)} rows left", file=sys.stderr)
    check(bool(kept), f"{path}: no usable rows (of {len(rows)}: {why})")
    return kept


def pad(seqs: list[list[int]], value: int, T: int | None = None, left: bool = False) -> torch.Tensor:
    """Lists of ints -> a (B, T) long tensor, padded with `value` on the right (training) or the left (generation:
    every row's next token then lands in the same column). T defaults to the longest row."""
    T = max(len(s) for s in seqs) if T is None else T
    return torch.tensor([[value] * (T - len(s)) + list(s) if left else list(s) + [value] * (T - len(s))
                         for s in seqs], dtype=torch.long)


def collate_sft(examples: list[tuple], pad_id: int, multiple_of: int = 1) -> dict:
    """Right-pad [(ids, loss_mask)] -> input_ids, attention_mask (1 = real token), loss_mask (1 = target), each
    (B, T), T the longest row rounded up to a multiple of `multiple_of`."""
    T = -(-max(len(ids) for ids, _ in examples) // multiple_of) * multiple_of
    return {"input_ids": pad([ids for ids, _ in examples], pad_id, T),
            "attention_mask": pad([[1] * len(ids) for ids, _ in examples], 0, T),
            "loss_mask": pad([m for _, m in examples], 0, T)}


def collate_responses(seqs: list[tuple], pad_id: int, max_len: int, multiple_of: int = 1) -> dict:
    """[(prompt_ids, response_ids, response_mask)] -> right-padded input_ids, attention_mask (1 = real token) and
    response_mask (1 = response token in the loss), each (N, T); T rounded up to multiple_of. A row longer than
    max_len loses its tail."""
    b = collate_sft([((p + r)[:max_len], ([0] * len(p) + list(m))[:max_len]) for p, r, m in seqs], pad_id, multiple_of)
    return {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"], "response_mask": b["loss_mask"]}


def collate_pairs(examples: list[dict], pad_id: int, max_len: int, multiple_of: int = 1) -> dict:
    """B pairs -> ONE (2B, T) batch, chosen rows 0..B-1 then rejected rows B..2B-1: one forward pass scores both
    halves, with exactly the same masking (OpenRLHF #294 masked only one half)."""
    return collate_responses([(e["prompt"], e[k], e[k + "_mask"]) for k in ("chosen", "rejected") for e in examples],
                             pad_id, max_len, multiple_of)


def collate_unpaired(examples: list[dict], pad_id: int, max_len: int) -> dict:
    """B unpaired rows -> a (B, T) batch, "labels" (B,) bool, and as kl_input_ids, kl_attention_mask and
    kl_response_mask the mismatched pairs KTO estimates its reference point z0 from: prompt i with completion i+1
    (mod B) (Ethayarajh et al. 2024, sec. 4.1; needs B > 1)."""
    batch = collate_responses([(e["prompt"], e["completion"], e["completion_mask"]) for e in examples], pad_id, max_len)
    kl = collate_responses([(e["prompt"], s["completion"], s["completion_mask"])
                            for e, s in zip(examples, examples[1:] + examples[:1])], pad_id, max_len)
    return {**batch, **{f"kl_{k}": v for k, v in kl.items()}, "labels": torch.tensor([e["label"] for e in examples])}
