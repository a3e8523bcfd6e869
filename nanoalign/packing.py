"""Several sequences in one row: a speed-up, kept here so the scripts read as if every sequence had its own row.

- SFT packing (pack_sft, collate_packed): whole conversations side by side, each attending only to itself.
- Prompt-shared rows: a preference pair as [prompt | chosen | rejected] (collate_shared), and PPO's k samples of a
  prompt as [prompt | response 1 | ... | response k] (share_prompts). The prompt's forward and backward run once.

Every layout is expressed as segments: segment 0 is a shared prefix that every token of the row may see, and a token
of segment s > 0 sees only the prefix and its own segment (causally). Positions restart where the plain row would
have them, so each hidden state equals the one of the unpacked row (tested against it). The model itself knows
nothing of this: it receives the (B, 1, T, T) mask from segment_mask() as its attention_mask.
"""
import torch

from .data import collate_sft, pad
from .logprobs import logprobs_chunked
from .model import build_mask


def segment_mask(attention_mask, segment_ids):
    """(B, T) 0/1 mask and (B, T) segment ids (-1 on padding) -> the boolean (B, 1, T, T) mask the model takes as
    attention_mask."""
    T = segment_ids.shape[1]
    q, k = segment_ids[:, :, None], segment_ids[:, None, :]
    allowed = ((k == 0) | (q == k)) & (q >= 0)  # (B, T, T): the shared prefix, or the query's own segment
    return build_mask(attention_mask, T, T, allowed=allowed)


# --- SFT packing ------------------------------------------------------------------------------------------------
def pack_sft(examples: list[tuple], max_len: int) -> list[list[tuple]]:
    """Group whole conversations into rows of at most max_len tokens (first fit, in order; none is split)."""
    rows, room = [], []
    for ex in examples:
        n = len(ex[0])
        for i in range(len(rows)):
            if n <= room[i]:
                rows[i].append(ex)
                room[i] -= n
                break
        else:
            rows.append([ex])
            room.append(max_len - n)
    return rows


def collate_packed(rows: list[list[tuple]], pad_id: int, multiple_of: int = 1) -> dict:
    """Packed rows -> collate_sft's tensors, with a (B, 1, T, T) attention_mask that keeps each conversation to
    itself and position_ids that restart at 0 in each one, so it sees exactly what it would see alone. The first
    token of every conversation is never a target: it is not predicted from the one before it."""
    flat = [([t for ids, _ in docs for t in ids], [m if j else 0 for _, mask in docs for j, m in enumerate(mask)])
            for docs in rows]
    batch = collate_sft(flat, pad_id, multiple_of)
    T = batch["input_ids"].shape[1]
    segments = pad([[d + 1 for d, (ids, _) in enumerate(docs) for _ in ids] for docs in rows], -1, T)
    batch["position_ids"] = pad([[p for ids, _ in docs for p in range(len(ids))] for docs in rows], 0, T)
    batch["attention_mask"] = segment_mask(batch["attention_mask"], segments)
    return batch


# --- prompt-shared preference pairs -----------------------------------------------------------------------------
def collate_shared(examples: list[dict], pad_id: int, max_len: int, multiple_of: int = 1) -> dict:
    """B pairs -> B rows [prompt | chosen | rejected]: the prompt is run ONCE for both responses.

    The rejected response continues from the end of the prompt (its positions restart there) and sees the prompt and
    itself only, so every hidden state equals the one the two-row batch of prefs.collate_pairs gives. A response
    keeps the first max_len - len(prompt) tokens, as there. prev_index[t] is the position whose hidden state predicts
    token t: t - 1, except the rejected response's first token, predicted from the prompt's last token.
    response_mask marks the tokens a loss needs; branch_ids says whose they are (1 chosen, 2 rejected); each
    response's reward is read at its last token (last_index, (B, 2))."""
    rows = []
    for e in examples:
        p = e["prompt"]
        c, cm, r, rm = (e[k][:max_len - len(p)] for k in ("chosen", "chosen_mask", "rejected", "rejected_mask"))
        rows.append((p, c, cm, r, rm))
    T = -(-max(len(p) + len(c) + len(r) for p, c, _, r, _ in rows) // multiple_of) * multiple_of
    ids, att, pos, branch, resp, prev = (torch.zeros(len(rows), T, dtype=torch.long) for _ in range(6))
    branch.fill_(-1)
    last = torch.zeros(len(rows), 2, dtype=torch.long)
    for i, (p, c, cm, r, rm) in enumerate(rows):
        P, n = len(p), len(p) + len(c) + len(r)
        ids[i] = torch.tensor(p + c + r + [pad_id] * (T - n))
        att[i, :n] = 1
        pos[i, :n] = torch.cat([torch.arange(P + len(c)), torch.arange(P, P + len(r))])
        branch[i, :n] = torch.tensor([0] * P + [1] * len(c) + [2] * len(r))
        resp[i, :n] = torch.tensor([0] * P + list(cm) + list(rm))
        prev[i] = (torch.arange(T) - 1).clamp(min=0)
        prev[i, P + len(c)] = P - 1  # the rejected response starts right after the prompt, not after chosen
        last[i] = torch.tensor([P + len(c) - 1, n - 1])
    return {"input_ids": ids, "attention_mask": segment_mask(att, branch), "position_ids": pos, "branch_ids": branch,
            "response_mask": resp, "prev_index": prev, "last_index": last}


def branch_logprobs(model, input_ids, attention_mask, position_ids, prev_index, labels_mask,
                    temperature: float = 1.0, chunk: int = 128, compiled: bool = False):
    """Per-token log-probs of prompt-shared rows (collate_shared), aligned with input_ids (B, T): entry t is
    log p(input_ids[t] | the prompt and its own response so far) / T, read from the hidden state at prev_index[t];
    0 where labels_mask is 0."""
    B, T = input_ids.shape
    hidden = model(input_ids, attention_mask, position_ids=position_ids, return_hidden=True)
    keep = labels_mask.bool()  # (B, T)
    rows = torch.arange(B, device=input_ids.device)[:, None].expand(B, T)
    sel = hidden[rows[keep], prev_index[keep]]  # (K, C): the predicting hidden state of each kept token
    logp = logprobs_chunked(sel, model.lm_head.weight, input_ids[keep], temperature, chunk, compiled)
    return logp.new_zeros(B, T).masked_scatter(keep, logp)


# --- prompt-shared PPO rollouts ---------------------------------------------------------------------------------
def share_prompts(seq, attn, mask, P: int, k: int) -> dict:
    """Rollout rows -> prompt-shared rows, so that a prompt runs once for its k responses.

    seq, attn (B, P+N): left-padded prompts, then responses; mask (B, N): 1 on each response's tokens, a prefix of
    the row. The k responses of a prompt are k consecutive rows. Row g of the result is [prompt | response 1 | ... |
    response k], unpadded; positions restart after the prompt for each response, and each response sees the prompt
    and itself only, so every hidden state is the one the unshared row gives. "prev" (B, N) is the index, into the
    result's rows flattened to (B/k · T,), of the hidden state that predicts response token t of row b: the prompt's
    last token for t = 0, else the token before (0 where mask is 0); "last" (B,) is the same kind of index of each
    response's last token (where a reward is read)."""
    B, N = mask.shape
    plens, rlens = attn[:, :P].sum(1).tolist(), mask.sum(1).tolist()
    G = B // k
    T = max(plens[g * k] + sum(rlens[g * k:(g + 1) * k]) for g in range(G))
    ids, att, pos = (torch.zeros(G, T, dtype=torch.long) for _ in range(3))
    branch = torch.full((G, T), -1, dtype=torch.long)
    prev, last = torch.zeros(B, N, dtype=torch.long), torch.zeros(B, dtype=torch.long)
    cpu = seq.cpu()
    for g in range(G):
        p = plens[g * k]
        ids[g, :p], att[g, :p], pos[g, :p], branch[g, :p] = cpu[g * k, P - p:P], 1, torch.arange(p), 0
        at = p  # where the next response starts in row g
        for j in range(k):
            b, n = g * k + j, rlens[g * k + j]
            ids[g, at:at + n], att[g, at:at + n], branch[g, at:at + n] = cpu[b, P:P + n], 1, j + 1
            pos[g, at:at + n] = torch.arange(p, p + n)
            prev[b, :n] = g * T + torch.arange(at - 1, at + n - 1)  # the token before ...
            prev[b, 0] = g * T + p - 1  # ... except for the first: the prompt's last token
            last[b] = g * T + at + n - 1
            at += n
    out = {"input_ids": ids, "attention_mask": segment_mask(att, branch), "position_ids": pos}
    return {key: v.to(seq.device) for key, v in {**out, "prev": prev, "last": last}.items()}


def local_rows(rows: torch.Tensor, group: int, rank: int, world: int) -> torch.Tensor:
    """Of `rows` (indices into a global batch made of groups of `group` consecutive rows, e.g. the k samples of a
    prompt, dealt out round-robin by loop.shard), the ones this rank holds, as indices into its own rows, in the
    order given. Group g lives on rank g % world, as its group g // world. May be empty."""
    g, j = rows // group, rows % group
    return ((g // world) * group + j)[g % world == rank]
