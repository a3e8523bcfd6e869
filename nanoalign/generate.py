"""Batched sampling with a preallocated KV cache, left padding, and per-row EOS stopping.

Prompts are left-padded so that every row's next token lands in the same column; positions come from the
attention mask (cumsum - 1), so a padded row sees exactly the positions it would see alone (pitfall 2).

    python -m nanoalign.generate --model DIR --prompts prompts.jsonl --out completions.jsonl [--temperature 0]
"""
import copy
import itertools
import json
import os
import time
import weakref
from dataclasses import dataclass

import torch

from .cli import check, run


@dataclass
class Rollout:
    sequences: torch.Tensor  # (B, P+N) left-padded prompt, then the response, right-padded after EOS
    attention_mask: torch.Tensor  # (B, P+N) 1 on real prompt and response tokens
    response_mask: torch.Tensor  # (B, N) 1 on generated tokens up to and including EOS
    prompt_len: int  # P, the padded prompt width

    def responses(self) -> list[list[int]]:
        """Generated token ids per row, including the EOS token when the row stopped."""
        resp = self.sequences[:, self.prompt_len:]
        return [r[m.bool()].tolist() for r, m in zip(resp, self.response_mask)]


def left_pad(prompts: list[list[int]], pad_id: int):
    P = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), P), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), P), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, P - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, P - len(p):] = 1
    return ids, mask


def sample_next(logits, temperature: float, top_k: int = 0, top_p: float = 1.0, generator=None, uniforms=None):
    """logits (B, V) -> next ids (B,). temperature 0 is greedy. top-k/top-p make the sampling impure (see PPO).
    uniforms: (B,) U(0, 1) draws to use instead of drawing from `generator`."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, idx = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > top_p  # keep the smallest prefix whose mass reaches top_p
        logits = logits.scatter(-1, idx, sorted_logits.masked_fill(drop, float("-inf")))
    # inverse-CDF sampling: one uniform per row (torch.multinomial draws one exponential per vocabulary entry)
    cdf = logits.softmax(-1).cumsum(-1)  # (B, V)
    u = torch.rand(cdf.shape[0], 1, generator=generator, device=cdf.device) if uniforms is None else uniforms[:, None]
    u = u.to(cdf) * cdf[:, -1:]
    return torch.searchsorted(cdf, u).squeeze(-1).clamp(max=cdf.shape[-1] - 1)


def _forward_last(model, ids, mask, cache_pos):
    """One cached forward; returns the last position's logits (B, V) in fp32."""
    h = model(ids, attention_mask=mask, cache_pos=cache_pos, return_hidden=True)[:, -1]
    return model.lm_head(h).float()


_compiled_step = None
_PACKED: dict[int, torch.Tensor] = {}  # key -> a weight in oneDNN's blocked layout (see PackedLinear)
_next_key = itertools.count(1)


@torch.library.custom_op("nanoalign::packed_linear", mutates_args=())
def packed_linear(x: torch.Tensor, key: torch.Tensor, out_features: int) -> torch.Tensor:
    """x @ W.T for the packed W in _PACKED[key]. As a custom op it is one opaque call to torch.compile, which cannot
    trace oneDNN's packed tensors; and the key is a tensor input, not a constant, so a new sampling copy (PPO makes
    one per iteration) runs the same compiled step."""
    return torch.ops.mkldnn._linear_pointwise(x, _PACKED[int(key)], None, "none", [], "")


@packed_linear.register_fake
def _(x, key, out_features):
    return x.new_empty(*x.shape[:-1], out_features)


class PackedLinear(torch.nn.Module):
    """A frozen bias-free Linear whose weight oneDNN reorders once into its blocked layout (what inductor's freezing
    pass does for CPU inference): the same outputs, and decoding's small-batch matmuls run ~1.3x faster here."""

    def __init__(self, weight, batch_hint: int = 8):
        super().__init__()
        self.out_features = weight.shape[0]
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), batch_hint)  # opaque: not a parameter
        key = next(_next_key)
        self.register_buffer("key", torch.tensor(key), persistent=False)
        _PACKED[key] = self.packed
        weakref.finalize(self, _PACKED.pop, key, None)  # the registry's entry goes with this module

    def forward(self, x):
        if torch.compiler.is_compiling():
            return packed_linear(x, self.key, self.out_features)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "none", [], "")  # eager: no custom-op toll


def pack_linears(model):
    """Swap the transformer's nn.Linear layers (and lm_head) for PackedLinear, on a CPU build with oneDNN."""
    if next(model.parameters()).device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return model
    for parent in [model, *(m for layer in model.model.layers for m in layer.children())]:
        for name, child in list(parent.named_children()):
            if type(child) is torch.nn.Linear and child.bias is None and name != "score":
                setattr(parent, name, PackedLinear(child.weight))
    return model


def fuse_projections(model):
    """Stack q/k/v and gate/up into one Linear each (model.py's qkv_proj, gate_up_proj): two matmuls where there
    were five, per layer and decoded token."""
    def stacked(*linears):
        fused = torch.nn.Linear(linears[0].in_features, sum(m.out_features for m in linears), bias=False,
                                device="meta")  # no random init: the weight is set next
        fused.weight = torch.nn.Parameter(torch.cat([m.weight for m in linears]), requires_grad=False)
        return fused
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        if not all(type(m) is torch.nn.Linear for m in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj,
                                                         mlp.up_proj)):
            continue  # e.g. an NF4 layer no adapter was merged into: left as it is
        attn.qkv_proj = stacked(attn.q_proj, attn.k_proj, attn.v_proj)
        attn.q_proj = attn.k_proj = attn.v_proj = None
        mlp.gate_up_proj = stacked(mlp.gate_proj, mlp.up_proj)
        mlp.gate_proj = mlp.up_proj = None
    return model


@torch.no_grad()
def sampling_copy(model, dtype=torch.bfloat16, pack: bool = True):
    """A frozen copy to sample from: LoRA merged into the weights, which are cast to `dtype`, fused (q/k/v and
    gate/up) and, with pack, reordered for oneDNN.
    Decoding reads every weight once per token, so on a CPU it is bound by memory traffic and per-op overhead: bf16
    halves the traffic, fusing and packing cut the overhead (see bench/generate.py). The samples come from a bf16
    rounding of the policy; PPO still takes every log-prob from the policy itself."""
    from .lora import merge_lora
    copied = fuse_projections(merge_lora(copy.deepcopy(model)).to(dtype).eval())
    return pack_linears(copied) if pack else copied


def generate(model, prompts: list[list[int]], max_new_tokens: int, eos_id: int, pad_id: int | None = None,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, generator=None,
             compile: bool = False, uniforms=None) -> Rollout:
    """Sample up to max_new_tokens per prompt; each row stops at its own EOS.
    uniforms: (B, max_new_tokens) U(0, 1) draws, row i's token t from uniforms[i, t], instead of `generator`: a row's
    sample then does not depend on the rest of the batch (PPO draws them for the global batch, so DDP is exact)."""
    global _compiled_step
    pad_id = eos_id if pad_id is None else pad_id
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    ids, pmask = left_pad(prompts, pad_id)
    ids, pmask = ids.to(device), pmask.to(device)
    B, P = ids.shape
    S = P + max_new_tokens
    # inference mode: no autograd bookkeeping at all, ~10% less per-op overhead than no_grad when decoding
    with torch.inference_mode():
        model.setup_cache(B, S)
        # the cache-wide mask: prompt padding is 0; every generated slot is 1 (causality hides the future ones)
        mask = torch.cat([pmask, torch.ones(B, max_new_tokens, dtype=torch.long, device=device)], dim=1)
        step = _forward_last
        if compile:
            if _compiled_step is None:  # C++ wrapper: no Python between the step's ~20 kernels per layer
                _compiled_step = torch.compile(_forward_last, dynamic=False, options={"cpp_wrapper": True})
            step = _compiled_step
        out = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=device)
        done = torch.zeros(B, dtype=torch.bool, device=device)
        resp_mask = torch.zeros(B, max_new_tokens, dtype=torch.long, device=device)
        # the prefill stays eager: compiled for varied widths it took ~3 min to compile here and saved ~25 of 115 ms
        logits = _forward_last(model, ids, mask, torch.arange(P, device=device))
        for t in range(max_new_tokens):
            u = None if uniforms is None else uniforms[:, t]
            nxt = sample_next(logits, temperature, top_k, top_p, generator, u)
            nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
            out[:, t] = nxt
            resp_mask[:, t] = (~done).long()
            done = done | (nxt == eos_id)
            if t == max_new_tokens - 1 or (t % 8 == 7 and bool(done.all())):  # sync with the host only every 8 steps
                break
            logits = step(model, nxt[:, None], mask, torch.tensor([P + t], device=device))
        model.clear_cache()
        model.train(was_training)
        seq = torch.cat([ids, out], dim=1)
    # inference tensors cannot be saved for backward, and PPO trains on these rows: hand back ordinary copies
    return Rollout(seq.clone(), torch.cat([pmask, resp_mask], dim=1).clone(), resp_mask.clone(), P)


def generate_texts(model, tok, prompts, max_new_tokens=128, temperature=0.0, seed=0, batch_size=16, top_k=0,
                   top_p=1.0, compile=False) -> list[str]:
    """Prompts (strings or message lists) -> completion strings, in input order."""
    g = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    texts = []
    for i in range(0, len(prompts), batch_size):
        ids = [tok.render_prompt(p) for p in prompts[i:i + batch_size]]
        ro = generate(model, ids, max_new_tokens, tok.eos_id, tok.pad_id, temperature, top_k, top_p, g, compile)
        texts += [tok.decode(r) for r in ro.responses()]
    return texts


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
    compile: bool = False  # torch.compile the decode step
    bf16: bool = False  # sample from a bf16 copy of the weights (~1.35x faster decoding at batch 8 on this CPU)


def main(cfg: Config):
    from .data import read_prompts
    from .hub import load
    check(bool(cfg.model), "--model is required")
    check(bool(cfg.out), "--out is required")
    check(cfg.temperature >= 0, f"--temperature must be >= 0, got {cfg.temperature}")
    check(cfg.max_new_tokens > 0, f"--max-new-tokens must be > 0, got {cfg.max_new_tokens}")
    check(cfg.batch_size > 0, f"--batch-size must be > 0, got {cfg.batch_size}")
    check(0 < cfg.top_p <= 1, f"--top-p must be in (0, 1], got {cfg.top_p}")
    check(cfg.top_k >= 0, f"--top-k must be >= 0, got {cfg.top_k}")
    check(os.path.isdir(os.path.dirname(os.path.abspath(cfg.out))), f"{cfg.out}: directory does not exist")
    check(not os.path.isdir(cfg.out), f"{cfg.out}: is a directory, not a file path")
    rows = read_prompts(cfg.prompts)
    model, tok = load(cfg.model, cfg.device)
    model = sampling_copy(model) if cfg.bf16 else model
    t0 = time.time()
    texts = generate_texts(model, tok, [r["prompt"] for r in rows], cfg.max_new_tokens, cfg.temperature, cfg.seed,
                           cfg.batch_size, cfg.top_k, cfg.top_p, cfg.compile)
    tmp = cfg.out + ".tmp"
    with open(tmp, "w") as f:
        for r, t in zip(rows, texts):
            f.write(json.dumps({"prompt": r["prompt"], "completion": t}) + "\n")
    os.replace(tmp, cfg.out)
    print(f"wrote {len(texts)} completions to {cfg.out} in {time.time() - t0:.1f}s")
    return {"n": len(texts)}


if __name__ == "__main__":
    run(main, Config)
