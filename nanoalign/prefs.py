"""Preference rows (RM, DPO, KTO) -> token ids -> batches.

A response is tokenized inside its conversation: render_chat(prompt + response), keeping the ids after the rendered
prompt up to the last loss-masked token, so it ends with <|im_end|>, not with the template's trailing "\n"; its mask
is 1 on assistant tokens only. Padding is masked by position, never by token id (SmolLM2 pads with its EOS). A row
longer than max_len loses the end of its response at collate time; a prompt that leaves no room makes it unusable.
The prompt-shared layout of a pair, [prompt | chosen | rejected] in one row, is packing.collate_shared.
"""
import sys
from collections import Counter

import torch

from .cli import check
from .data import collate_sft, read_jsonl, read_prefs, read_unpaired


def read_kto(path: str) -> list[dict]:
    """KTO's unpaired rows: read_unpaired's (a file with "label"), or preference pairs split into them (chosen:
    label true, rejected: label false)."""
    if "label" in read_jsonl(path)[0][1]:
        return read_unpaired(path)
    return [{"prompt": r["prompt"], "completion": r[k], "label": k == "chosen", "line": r["line"]}
            for r in read_prefs(path) for k in ("chosen", "rejected")]


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
