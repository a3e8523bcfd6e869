"""Preference rows (RM, DPO, KTO) -> token ids -> batches (pairs: the B chosen rows first, then the B rejected).

The rows come from nanoalign.data's readers (read_prefs, read_unpaired). Padding is masked by position, never by
token id, as for SFT (pitfall 1).
"""
import sys

import torch

from .cli import UserError
from .data import pad

def pairs_to_unpaired(rows: list[dict]) -> list[dict]:
    """Split preference pairs into KTO's unpaired rows: chosen -> label true, rejected -> label false."""
    out = []
    for r in rows:
        out.append({"prompt": r["prompt"], "completion": r["chosen"], "label": True, "line": r.get("line")})
        out.append({"prompt": r["prompt"], "completion": r["rejected"], "label": False, "line": r.get("line")})
    return out


# --- preference collation (RM, DPO, KTO) -----------------------------------------------------------------------
# A response is tokenized inside its conversation: render_chat(prompt + response), keeping the ids after the
# rendered prompt (render_prompt(prompt) must be a prefix) up to the last loss-masked token, so the response ends
# with <|im_end|>, not with the template's trailing "\n". Its mask is 1 on assistant tokens only (a multi-turn
# response keeps its user turns out of the loss). Rows longer than max_len lose the end of their response at
# collate time; a prompt with no room left for a response makes the row unusable.

def tokenize_response(tok, prompt: list[dict], response: list[dict], where: str = "data") -> tuple[list, list, list]:
    """-> (prompt_ids, response_ids, response_mask)."""
    p = tok.render_prompt(prompt)
    ids, mask = tok.render_chat(prompt + response)
    if ids[:len(p)] != p:  # cannot happen with ChatML specials; guards a tokenizer that merges across turns
        raise UserError(f"{where}: the rendered prompt is not a prefix of the rendered conversation")
    end = max(i for i, m in enumerate(mask) if m) + 1  # just past the last <|im_end|> in the loss
    return p, ids[len(p):end], mask[len(p):end]


def _report(path: str, n_rows: int, kept: list, dropped: dict, verbose: bool):
    why = ", ".join(f"{n} {what}" for what, n in dropped.items() if n)
    if why and verbose:
        print(f"{path}: dropped {why}; {len(kept)} of {n_rows} rows left", file=sys.stderr)
    if not kept:
        raise UserError(f"{path}: no usable rows (of {n_rows}: {why})")


def tokenize_prefs(tok, rows: list[dict], max_len: int, path: str = "data", verbose: bool = True) -> list[dict]:
    """read_prefs rows -> [{"prompt", "chosen", "chosen_mask", "rejected", "rejected_mask", "line"}] (token ids).
    Drops (and reports) rows whose prompt leaves no room under max_len, and rows with chosen == rejected."""
    kept, too_long, same = [], 0, 0
    for r in rows:
        if r["chosen"] == r["rejected"]:  # no preference to learn; DPO's gradient would be exactly 0
            same += 1
            continue
        where = f"{path}:{r.get('line')}"
        p, c, cm = tokenize_response(tok, r["prompt"], r["chosen"], where)
        _, j, jm = tokenize_response(tok, r["prompt"], r["rejected"], where)
        if len(p) >= max_len:
            too_long += 1
            continue
        kept.append({"prompt": p, "chosen": c, "chosen_mask": cm, "rejected": j, "rejected_mask": jm,
                     "line": r.get("line")})
    _report(path, len(rows), kept, {f"with a prompt longer than --max-len {max_len}": too_long,
                                    "with chosen == rejected": same}, verbose)
    return kept


def tokenize_unpaired(tok, rows: list[dict], max_len: int, path: str = "data", verbose: bool = True) -> list[dict]:
    """read_unpaired / pairs_to_unpaired rows -> [{"prompt", "completion", "completion_mask", "label", "line"}]."""
    kept, too_long = [], 0
    for r in rows:
        p, c, cm = tokenize_response(tok, r["prompt"], r["completion"], f"{path}:{r.get('line')}")
        if len(p) >= max_len:
            too_long += 1
            continue
        kept.append({"prompt": p, "completion": c, "completion_mask": cm, "label": bool(r["label"]),
                     "line": r.get("line")})
    _report(path, len(rows), kept, {f"with a prompt longer than --max-len {max_len}": too_long}, verbose)
    return kept


def collate_responses(seqs: list[tuple], pad_id: int, max_len: int, multiple_of: int = 1) -> dict:
    """[(prompt_ids, response_ids, response_mask)] -> right-padded input_ids, attention_mask (1 = real token) and
    response_mask (1 = response token in the loss), each (N, T). Padding is 0 in both masks by position, whatever
    its id (pad == EOS for SmolLM2). A row longer than max_len loses its tail."""
    ids = [(p + r)[:max_len] for p, r, _ in seqs]
    masks = [([0] * len(p) + list(m))[:max_len] for p, _, m in seqs]
    T = -(-max(len(x) for x in ids) // multiple_of) * multiple_of
    return {"input_ids": pad(ids, pad_id, T),  # (N, T)
            "attention_mask": pad([[1] * len(x) for x in ids], 0, T),  # (N, T)
            "response_mask": pad(masks, 0, T)}  # (N, T)


def collate_pairs(examples: list[dict], pad_id: int, max_len: int, multiple_of: int = 1) -> dict:
    """B pairs -> ONE (2B, T) batch, chosen rows 0..B-1 then rejected rows B..2B-1: a single forward pass scores
    both halves, and both get exactly the same masking (OpenRLHF #294 masked only one half)."""
    seqs = [(e["prompt"], e["chosen"], e["chosen_mask"]) for e in examples]
    seqs += [(e["prompt"], e["rejected"], e["rejected_mask"]) for e in examples]
    return collate_responses(seqs, pad_id, max_len, multiple_of)


def collate_unpaired(examples: list[dict], pad_id: int, max_len: int, mismatched: bool = False,
                     multiple_of: int = 1) -> dict:
    """B unpaired rows -> a (B, T) batch plus "labels" (B,) bool. With mismatched, also kl_input_ids,
    kl_attention_mask, kl_response_mask: prompt i with completion i+1 (mod B), the mismatched pairs KTO estimates
    its reference point z0 from (Ethayarajh et al. 2024, sec. 4.1; needs B > 1)."""
    batch = collate_responses([(e["prompt"], e["completion"], e["completion_mask"]) for e in examples], pad_id,
                              max_len, multiple_of)
    batch["labels"] = torch.tensor([e["label"] for e in examples])  # (B,)
    if mismatched:
        shifted = examples[1:] + examples[:1]
        kl = [(e["prompt"], s["completion"], s["completion_mask"]) for e, s in zip(examples, shifted)]
        kl = collate_responses(kl, pad_id, max_len, multiple_of)
        batch.update({f"kl_{k}": v for k, v in kl.items()})
    return batch
