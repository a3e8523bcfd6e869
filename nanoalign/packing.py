"""Several sequences in one row: speed-ups kept here, so the scripts read as if every sequence had its own row.

SFT packing puts whole conversations side by side (pack_sft); prompt sharing runs a prompt once for its responses
(shared_rows): a pair as [prompt | chosen | rejected], PPO's k samples as [prompt | response 1 | ... | response k].
A token sees the shared prefix and its own segment, causally, at the positions it would have alone, so every hidden
state equals the unpacked one (tested); the plain model only gets segment_mask()'s (B, 1, T, T) attention_mask.
"""
import torch

from .data import collate_sft, pad
from .logprobs import last_token_rewards, logprobs_chunked, sequence_logprobs
from .model import build_mask


def segment_mask(attention_mask, segment_ids):
    """(B, T) 0/1 mask and (B, T) segment ids (-1 on padding) -> the boolean (B, 1, T, T) attention_mask."""
    q, k = segment_ids[:, :, None], segment_ids[:, None, :]
    allowed = ((k == 0) | (q == k)) & (q >= 0)  # (B, T, T): the shared prefix, or the query's own segment
    return build_mask(attention_mask, segment_ids.shape[1], segment_ids.shape[1], allowed=allowed)


def pack_sft(examples: list[tuple], max_len: int) -> list[list[tuple]]:
    """Whole (ids, mask) conversations (each ≤ max_len tokens) into rows of ≤ max_len tokens: first fit, in order."""
    rows, room = [[] for _ in examples], [max_len] * len(examples)  # at worst, one row each
    for ex in examples:
        i = next(i for i, r in enumerate(room) if len(ex[0]) <= r)  # the first row it fits in
        rows[i].append(ex)
        room[i] -= len(ex[0])
    return [r for r in rows if r]


def collate_packed(rows: list[list[tuple]], pad_id: int, multiple_of: int = 1) -> dict:
    """Packed rows -> collate_sft's tensors, with the segment mask and position_ids restarting at 0 in each
    conversation. A conversation's first token is never a target: nothing in its own conversation predicts it."""
    flat = [([t for ids, _ in docs for t in ids], [m if j else 0 for _, mask in docs for j, m in enumerate(mask)])
            for docs in rows]
    batch = collate_sft(flat, pad_id, multiple_of)
    T = batch["input_ids"].shape[1]
    segments = pad([[d + 1 for d, (ids, _) in enumerate(docs) for _ in ids] for docs in rows], -1, T)
    batch["position_ids"] = pad([[p for ids, _ in docs for p in range(len(ids))] for docs in rows], 0, T)
    batch["attention_mask"] = segment_mask(batch["attention_mask"], segments)
    return batch


def shared_rows(prompts: list[list], responses: list[list[list]], pad_id: int, multiple_of: int = 1) -> dict:
    """G prompts, each with k responses (token lists) -> G rows [prompt | response 1 | ... | response k]: input_ids,
    attention_mask, position_ids (restarting at len(prompt) for each response), branch_ids (0 prompt, j + 1 response
    j, -1 padding), prev_index (the position that predicts token t) and last_index (G, k): each response's last."""
    ids, pos, branch, prev, last = [], [], [], [], []
    for p, rs in zip(prompts, responses):
        P = len(p)
        ids.append(list(p) + [t for r in rs for t in r])
        pos.append(list(range(P)) + [P + i for r in rs for i in range(len(r))])
        branch.append([0] * P + [j + 1 for j, r in enumerate(rs) for _ in r])
        starts = [P + sum(map(len, rs[:j])) for j in range(len(rs))]
        prev.append([max(t - 1, 0) for t in range(P)] + [a + i - 1 if i else P - 1  # a response's first: prompt's last
                                                         for a, r in zip(starts, rs) for i in range(len(r))])
        last.append([a + len(r) - 1 for a, r in zip(starts, rs)])
    T = -(-max(map(len, ids)) // multiple_of) * multiple_of
    branch = pad(branch, -1, T)
    return {"input_ids": pad(ids, pad_id, T), "attention_mask": segment_mask((branch >= 0).long(), branch),
            "position_ids": pad(pos, 0, T), "branch_ids": branch, "prev_index": pad(prev, 0, T),
            "last_index": torch.tensor(last)}


def collate_shared(examples: list[dict], pad_id: int, max_len: int, multiple_of: int = 1) -> dict:
    """B pairs -> B rows [prompt | chosen | rejected], the pairs of data.collate_pairs' 2B rows (each response keeps
    its first max_len - len(prompt) tokens, as there), plus response_mask: 1 on the tokens a loss reads."""
    cut = [{k: e[k][:max_len - len(e["prompt"])] for k in ("chosen", "chosen_mask", "rejected", "rejected_mask")}
           for e in examples]
    batch = shared_rows([e["prompt"] for e in examples], [[c["chosen"], c["rejected"]] for c in cut], pad_id,
                        multiple_of)
    masks = [[0] * len(e["prompt"]) + c["chosen_mask"] + c["rejected_mask"] for e, c in zip(examples, cut)]
    batch["response_mask"] = pad(masks, 0, batch["input_ids"].shape[1])
    return batch


def per_response(batch, x):  # (rows, T) values of a pair batch, either layout -> (chosen, rejected) sums, each (B,)
    if "branch_ids" not in batch:
        return x.sum(-1).chunk(2)
    return tuple((x * (batch["branch_ids"] == k)).sum(-1) for k in (1, 2))


def pair_logprobs(model, batch, compiled: bool = False):
    """(log π(y_w|x), log π(y_l|x)), each (B,) fp32: each response's token log-probs, summed, for either layout."""
    ids, keep = batch["input_ids"], batch["response_mask"].bool()
    if "prev_index" not in batch:
        return sequence_logprobs(model, ids, batch["attention_mask"], keep, compiled=compiled).chunk(2)
    hidden = model(ids, batch["attention_mask"], position_ids=batch["position_ids"], return_hidden=True)
    sel = hidden[keep.nonzero()[:, 0], batch["prev_index"][keep]]  # (K, C): the state predicting each response token
    logp = logprobs_chunked(sel, model.lm_head.weight, ids[keep], compiled=compiled)  # (K,) fp32
    return per_response(batch, logp.new_zeros(ids.shape).masked_scatter(keep, logp))


def pair_lengths(batch):  # (chosen, rejected) response token counts, each (B,) float, for per-token averages
    return tuple(n.clamp(min=1) for n in per_response(batch, batch["response_mask"].float()))


def pair_rewards(rm, batch):  # (chosen, rejected) RM scores, each (B,) fp32, at each response's last token
    ids, attn = batch["input_ids"], batch["attention_mask"]
    if "last_index" not in batch:
        return last_token_rewards(rm, ids, attn).chunk(2)
    last = torch.arange(len(ids), device=ids.device)[:, None] * ids.shape[1] + batch["last_index"]  # (B, 2), flattened
    return last_token_rewards(rm, ids, attn, batch["position_ids"], last).unbind(1)


def share_prompts(seq, attn, mask, P: int, k: int) -> dict:
    """PPO's rollouts -> shared_rows, so a prompt runs once for its k responses (k consecutive rows). seq, attn
    (B, P+N): left-padded prompts, then responses; mask (B, N): 1 on each response's tokens, a prefix. "prev" (B, N)
    indexes, into the result's rows flattened to (B/k · T,), the state that predicts response token t of row b (0
    where mask is 0); "last" (B,) the same kind of index of each response's last token."""
    B, N = mask.shape
    plens, rlens, cpu = attn[:, :P].sum(1).tolist(), mask.sum(1).tolist(), seq.cpu()
    s = shared_rows([cpu[g, P - plens[g]:P].tolist() for g in range(0, B, k)],  # each prompt once, its k responses
                    [[cpu[b, P:P + rlens[b]].tolist() for b in range(g, g + k)] for g in range(0, B, k)], 0)
    T = s["input_ids"].shape[1]
    base = torch.arange(B // k).repeat_interleave(k) * T  # (B,): where row b's group starts, flattened
    first = s["last_index"].reshape(B) - torch.tensor(rlens) + 1  # (B,): each response's first position in its row
    idx = (first[:, None] + torch.arange(N)).clamp(max=T - 1)  # (B, N)
    prev = (base[:, None] + s["prev_index"].repeat_interleave(k, 0).gather(1, idx)) * mask.cpu().bool()
    s["prev"], s["last"] = prev, base + s["last_index"].reshape(B)
    return {key: s[key].to(seq.device) for key in ("input_ids", "attention_mask", "position_ids", "prev", "last")}


def local_rows(rows: torch.Tensor, group: int, rank: int, world: int) -> torch.Tensor:
    """Of `rows` (indices into a global batch of groups of `group` consecutive rows, dealt out by loop.shard: group g
    on rank g % world, as its group g // world), the ones this rank holds, as its own row indices. May be empty."""
    g, j = rows // group, rows % group
    return ((g // world) * group + j)[g % world == rank]


def response_hidden(model, seq, attn, mask, P: int, k: int = 1):
    """PPO's rollout rows (share_prompts' arguments) -> (B, N, C): the final hidden state that predicts each response
    token. k > 1: a prompt runs once for its k responses, same values; a rank with no rows runs plain."""
    if k > 1 and len(seq):
        s = share_prompts(seq, attn, mask, P, k)
        h = model(s["input_ids"], s["attention_mask"], s["position_ids"], return_hidden=True)  # (B/k, T, C)
        return h.flatten(0, 1)[s["prev"]]
    return model(seq, attn, return_hidden=True)[:, P - 1:-1]


def response_rewards(rm, seq, attn, mask, P: int, cut, eos_id: int, k: int = 1):
    """PPO's rollout rows -> the RM's scores (B,) fp32 at each response's last real token (k: as above). An RM only saw
    finished answers, so a row cut off before EOS (cut (B,) bool) is scored closed, by an EOS in a new last column."""
    col = cut.to(attn.dtype)[:, None]  # the new column: EOS on a cut row, a masked pad (0) on the others
    seq, attn, mask = torch.cat([seq, col * eos_id], 1), torch.cat([attn, col], 1), torch.cat([mask, col], 1)
    if k == 1:
        return last_token_rewards(rm, seq, attn)
    s = share_prompts(seq, attn, mask, P, k)
    return last_token_rewards(rm, s["input_ids"], s["attention_mask"], s["position_ids"], s["last"])
