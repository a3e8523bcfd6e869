"""Batched sampling with a preallocated KV cache and per-row EOS stopping. Prompts are left-padded, so every row's
next token lands in the same column; positions come from the attention mask, so a padded row sees what it would alone.

    python -m nanoalign.generate --model DIR --prompts prompts.jsonl --out completions.jsonl [--temperature 0]
"""
import os
from dataclasses import dataclass

import torch

from .cli import check, check_ranges, run
from .data import pad, read_prompts
from .fast import compiled, sampling_copy
from .hub import load
from .model import KVCache
from .tasks import write_jsonl


@dataclass
class Rollout:
    sequences: torch.Tensor  # (B, P+N) left-padded prompt, then the response, right-padded after EOS
    attention_mask: torch.Tensor  # (B, P+N) 1 on real prompt and response tokens
    response_mask: torch.Tensor  # (B, N) 1 on generated tokens up to and including EOS
    prompt_len: int  # P, the padded prompt width
    logprobs: torch.Tensor  # (B, N) fp32 log-prob of each generated token under the distribution it was drawn from

    def responses(self) -> list[list[int]]:  # generated token ids per row, with the EOS token when the row stopped
        return [r[m.bool()].tolist() for r, m in zip(self.sequences[:, self.prompt_len:], self.response_mask)]


def filter_logits(logits, top_k: int = 0, top_p: float = 1.0):
    """-inf for every logit outside the top k, then for every token whose more likely tokens already hold top_p of
    the mass (nucleus sampling, Holtzman et al. 2020), with the boundaries of transformers' TopK/TopPLogitsWarper."""
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, idx = logits.sort(dim=-1, descending=True)
        p = sorted_logits.softmax(-1)
        before = p.cumsum(-1) - p  # the mass of the tokens ranked above each one
        logits = logits.scatter(-1, idx, sorted_logits.masked_fill(before >= top_p, float("-inf")))
    return logits


def sample_next(logits, temperature: float, top_k: int = 0, top_p: float = 1.0, generator=None, uniforms=None):
    """logits (B, V) -> next ids (B,) and their fp32 log-probs (B,) under the distribution that drew them (the logits
    / T, top-k/top-p filtered); temperature 0 is greedy. uniforms (B,) in [0, 1) replace draws from generator."""
    if temperature == 0:  # log-probs of the unscaled logits: those of the argmax's own point mass would all be 0
        nxt = logits.argmax(-1)
        return nxt, logits.float().log_softmax(-1).gather(-1, nxt[:, None]).squeeze(-1)
    logits = filter_logits(logits.float() / temperature, top_k, top_p)  # (B, V), -inf outside top-k/top-p
    cdf = logits.softmax(-1).cumsum(-1)
    # inverse-CDF sampling, one uniform per row (torch.multinomial draws one per vocabulary entry). Token i owns
    # [cdf[i-1], cdf[i]): the right side skips a token of probability 0 even at u = 0; the clamp, a u cast up to 1
    u = torch.rand(cdf.shape[0], 1, generator=generator, device=cdf.device) if uniforms is None else uniforms[:, None]
    nxt = torch.searchsorted(cdf, u.to(cdf) * cdf[:, -1:], right=True).squeeze(-1).clamp(max=cdf.shape[-1] - 1)
    return nxt, logits.log_softmax(-1).gather(-1, nxt[:, None]).squeeze(-1)


def forward_last(model, ids, mask, cache_pos):
    """One cached forward; returns the last position's logits (B, V) in fp32 (the lm_head on that position only)."""
    return model.lm_head(model(ids, attention_mask=mask, cache_pos=cache_pos, return_hidden=True)[:, -1]).float()


def generate(model, prompts: list[list[int]], max_new_tokens: int, eos_id: int, pad_id: int | None = None,
             temperature=1.0, top_k=0, top_p=1.0, generator=None, compile=False, uniforms=None) -> Rollout:
    """Sample up to max_new_tokens per prompt; each row stops at its own EOS, and finished rows leave the batch.
    uniforms (B, max_new_tokens) in [0, 1): row i's token t drawn from uniforms[i, t], not `generator`: independent of
    its batch mates (PPO: exact DDP)."""
    pad_id = eos_id if pad_id is None else pad_id
    device, was_training = next(model.parameters()).device, model.training
    ids = pad(prompts, pad_id, left=True).to(device)  # (B, P)
    B, P = ids.shape
    # the cache-wide mask: 0 on prompt padding, 1 elsewhere (causality hides the slots not generated yet)
    mask = pad([[1] * (len(p) + max_new_tokens) for p in prompts], 0, left=True).to(device)  # (B, P + N)
    step = compiled(forward_last, decode=True) if compile else forward_last  # see nanoalign.fast
    with torch.inference_mode():  # no autograd bookkeeping at all: less per-op overhead than no_grad
        model.eval().setup_cache(B, P + max_new_tokens)
        out, done = torch.full((B, max_new_tokens), pad_id, device=device), torch.zeros(B, device=device).bool()
        logprobs = torch.zeros(B, max_new_tokens, device=device)  # of each sampled token, as sample_next drew it
        # the prefill stays eager: its width varies from call to call, and each width would be a new compile
        logits = forward_last(model, ids, mask, torch.arange(P, device=device))
        rows, live_mask = torch.arange(B, device=device), mask  # the batch rows still being decoded, their masks
        for t in range(max_new_tokens):
            u = None if uniforms is None else uniforms[rows, t]
            nxt, logprobs[rows, t] = sample_next(logits, temperature, top_k, top_p, generator, u)
            out[rows, t] = nxt = torch.where(done, pad_id, nxt)
            done = done | (nxt == eos_id)
            if t == max_new_tokens - 1 or (t % 8 == 7 and bool(done.all())):  # the host reads `done` only every
                break  # 8 steps: each read waits for the device
            if t % 8 == 7 and not compile and bool(done.any()):  # finished rows leave the batch, with their cache
                keep = (~done).nonzero().squeeze(1)  # rows (compiled, the shapes stay fixed: one graph, no recompiles)
                rows, done, nxt, live_mask = rows[keep], done[keep], nxt[keep], live_mask[keep]
                for cache in (m for m in model.modules() if isinstance(m, KVCache)):
                    cache.k, cache.v = cache.k[keep], cache.v[keep]
            logits = step(model, nxt[:, None], live_mask, torch.tensor([P + t], device=device))
        model.clear_cache()
    model.train(was_training)
    eos = out == eos_id
    resp_mask = (eos.cumsum(1) - eos.long() == 0).long()  # (B, N): 1 up to and including each row's first EOS
    # made outside inference mode, so PPO can train on them (inference tensors cannot be saved for backward)
    return Rollout(torch.cat([ids, out], 1), torch.cat([mask[:, :P], resp_mask], 1), resp_mask, P, logprobs * resp_mask)


def generate_texts(model, tok, prompts, max_new_tokens=128, temperature=0.0, seed=0, batch_size=16, top_k=0,
                   top_p=1.0, compile=False) -> list[str]:
    """Prompts (strings or message lists) -> completion strings, in input order."""
    g = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    batches = [[tok.render_prompt(p) for p in prompts[i:i + batch_size]] for i in range(0, len(prompts), batch_size)]
    return [tok.decode(r) for ids in batches for r in generate(model, ids, max_new_tokens, tok.eos_id, tok.pad_id,
                                                                temperature, top_k, top_p, g, compile).responses()]


@dataclass
class Config:
    """Generate completions for a prompts JSONL file: {"prompt": str or [messages]} -> {"prompt", "completion"}."""
    model: str = ""  # model: preset, alias, checkpoint dir or .gguf
    prompts: str = ""  # prompts JSONL
    out: str = ""  # output JSONL
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    max_new_tokens: int = 128  # per prompt
    seed: int = 0  # sampling seed
    batch_size: int = 16  # prompts per batch
    device: str = "cpu"  # cpu or cuda
    compile: bool = False  # torch.compile the decode step (a minute or two of compiling on first use)
    bf16: bool = False  # sample from a bf16 copy of the weights (faster decoding on a CPU)


def main(cfg: Config):
    check(bool(cfg.model), "--model is required")
    check(bool(cfg.out), "--out is required")
    check_ranges(cfg, positive=("max_new_tokens", "batch_size"), non_negative=("temperature", "top_k"))
    check(0 < cfg.top_p <= 1, f"--top-p must be in (0, 1], got {cfg.top_p}")
    check(os.path.isdir(os.path.dirname(os.path.abspath(cfg.out))), f"{cfg.out}: directory does not exist")
    check(not os.path.isdir(cfg.out), f"{cfg.out}: is a directory, not a file path")
    rows = read_prompts(cfg.prompts)
    model, tok = load(cfg.model, cfg.device)
    model = sampling_copy(model) if cfg.bf16 else model
    texts = generate_texts(model, tok, [r["prompt"] for r in rows], cfg.max_new_tokens, cfg.temperature, cfg.seed,
                           cfg.batch_size, cfg.top_k, cfg.top_p, cfg.compile)
    write_jsonl(cfg.out, [{"prompt": r["prompt"], "completion": t} for r, t in zip(rows, texts)])  # via a temp file
    print(f"wrote {len(texts)} completions to {cfg.out}")
    return {"n": len(texts)}


if __name__ == "__main__":
    run(main, Config)
