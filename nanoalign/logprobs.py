"""Per-token log-probs from final hidden states: the hot loop of every alignment loss.

    logp_t = h_t·W[y_t]/T − logsumexp(h_t·Wᵀ/T)

The textbook path (`logprobs_naive`) builds the (B, T, V) logits: 0.8 GB in fp32 at 8 × 512 × 49,152, and its
log_softmax and gradients three more. `logprobs_chunked` keeps one (chunk, V) block alive at a time, in fp32 even
under bf16 autocast (bf16 logits keep ~3 significant digits, coarser than the log-ratios PPO clips and DPO
compares), and its backward recomputes each chunk's softmax instead of storing it:

    ∂logp_t/∂h_t = (W[y_t] − softmax_t·W) / T        ∂logp_t/∂W = (onehot(y_t) − softmax_t)ᵀ h_t / T

With W frozen (LoRA, QLoRA) the h-gradient is computed in the forward pass instead: two matmuls, not three.
"""
import torch

from . import fast
from .model import last_token_index


def logprobs_naive(hidden, weight, labels, temperature: float = 1.0):
    """The reference: hidden (..., C), weight (V, C), labels (...) -> log p(labels) (...), fp32."""
    with torch.autocast(hidden.device.type, enabled=False):
        dtype = torch.promote_types(hidden.dtype, torch.float32)
        logits = hidden.to(dtype) @ weight.to(dtype).T / temperature  # (..., V)
        return torch.log_softmax(logits, dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def _log_softmax_(logits):  # IN PLACE through ATen's fused row kernel: one read and one write of the (n, V) block,
    return torch._log_softmax(logits, -1, False, out=logits)  # each row's max and sum taken while it is in cache


def _log_softmax(logits):  # compiled=True: the same as an inductor loop (dynamic shapes: no recompile per length)
    return logits.sub_(torch.logsumexp(logits, -1, keepdim=True))


def _mm_t(a, b):  # a @ bᵀ. On CPU in fp32 via oneDNN (fast.py's linear kernel): for a few hundred tokens times the
    # whole vocabulary its JIT GEMM keeps full speed, where torch.mm's BLAS call does not. Elsewhere plain torch.mm.
    if a.device.type == "cpu" and a.dtype == torch.float32 and torch.backends.mkldnn.is_available():
        return torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], "")
    return a @ b.T


def _chunks(n: int, chunk: int):  # near-equal chunks of at most `chunk` tokens (a size-1 tail would recompile)
    k = max(1, -(-n // chunk))
    b = [round(i * n / k) for i in range(k + 1)]
    return [(s, e) for s, e in zip(b, b[1:]) if e > s]


class ChunkedLogprobs(torch.autograd.Function):
    """logp (N,) of labels (N,) under softmax(hidden (N, C) · weight (V, C)ᵀ), one token chunk at a time."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk: int, log_softmax_, precompute_grad_h: bool):
        hidden, weight = hidden.detach(), weight.detach()  # same requires_grad flags every call: no recompiles
        logp, grad_h = hidden.new_empty(hidden.shape[0]), torch.empty_like(hidden) if precompute_grad_h else None
        for s, e in _chunks(hidden.shape[0], chunk):
            y = labels[s:e]
            logits = log_softmax_(_mm_t(hidden[s:e], weight))  # (n, V), then log_softmax over it in place
            logp[s:e] = logits.gather(1, y[:, None])[:, 0]  # read off directly: exact even where p_t underflows
            if precompute_grad_h:  # frozen W: ∂logp_t/∂h_t = W[y_t] − softmax_t·W is known now
                grad_h[s:e] = weight[y] - _mm_t(logits.exp_(), weight.T)
            del logits  # free this (n, V) block before the next chunk allocates its own
        ctx.save_for_backward(*((grad_h,) if precompute_grad_h else (hidden, weight, labels)))
        ctx.chunk, ctx.log_softmax_, ctx.precomputed = chunk, log_softmax_, precompute_grad_h
        return logp

    @staticmethod
    def backward(ctx, g):  # g (N,): upstream gradient of each token's log-prob
        if ctx.precomputed:
            return g[:, None] * ctx.saved_tensors[0], None, None, None, None, None
        hidden, weight, labels = ctx.saved_tensors  # W trains here (else precomputed), and h does in practice
        grad_h, grad_w = torch.empty_like(hidden), torch.zeros_like(weight)
        with torch.autocast(hidden.device.type, enabled=False):
            for s, e in _chunks(hidden.shape[0], ctx.chunk):
                y, gh = labels[s:e], g[s:e, None] * hidden[s:e]  # gh (n, C) = g_t·h_t: scale h, not the (n, V) block
                p = ctx.log_softmax_(_mm_t(hidden[s:e], weight)).exp_()  # recompute softmax_t (n, V), not stored
                grad_h[s:e] = g[s:e, None] * (weight[y] - _mm_t(p, weight.T))  # g_t·(W[y_t] − softmax_t·W)
                grad_w.addmm_(p.T, gh, alpha=-1.0).index_add_(0, y, gh)  # Σ_t (onehot(y_t) − softmax_t)ᵀ g_t·h_t
                del p
        return grad_h, grad_w, None, None, None, None


def logprobs_chunked(hidden, weight, labels, temperature: float = 1.0, chunk: int = 128, compiled: bool = False):
    """hidden (..., C), weight (V, C), labels (...) -> log p(labels) (...) in fp32 (fp64 for fp64 inputs). Equal to
    `logprobs_naive`, but the extra memory is one (chunk, V) block: 25 MB at 128 × 49,152 in fp32."""
    with torch.autocast(hidden.device.type, enabled=False):
        h = hidden.reshape(-1, hidden.shape[-1]).to(torch.promote_types(hidden.dtype, torch.float32))
        # logits/T = (h/T)·Wᵀ: scaling the (N, C) hidden is cheaper than the (N, V) logits, and autograd carries 1/T
        h = h / temperature if temperature != 1 else h
        precompute = torch.is_grad_enabled() and h.requires_grad and not weight.requires_grad
        log_softmax_ = fast.compiled(_log_softmax) if compiled else _log_softmax_
        logp = ChunkedLogprobs.apply(h, weight.to(h.dtype), labels.reshape(-1), chunk, log_softmax_, precompute)
    return logp.view(labels.shape)


def token_logprobs(model, input_ids, attention_mask=None, labels_mask=None, temperature: float = 1.0,
                   position_ids=None, chunk: int = 128, compiled: bool = False):
    """(B, T-1) fp32: entry t is log p(input_ids[t+1] | input_ids[≤t]) at `temperature` (RL log-probs must be
    taken at the sampling temperature, TRL #3029), and 0 where labels_mask (B, T) is 0, on padding, and where the
    context is all padding; those positions skip the lm_head. attention_mask (B, T): 1 = real token (by position,
    never by id: SmolLM2 pads with EOS); a packed batch passes its (B, 1, T, T) mask and position_ids instead."""
    h = model(input_ids, attention_mask, position_ids=position_ids, return_hidden=True)  # (B, T, C) final hidden states
    keep = (torch.ones_like(input_ids[:, 1:]) if labels_mask is None else labels_mask[:, 1:]).bool()  # (B, T-1)
    if attention_mask is not None and attention_mask.dim() == 2:  # target and context real (packed: labels_mask)
        keep = keep & attention_mask[:, 1:].bool() & attention_mask[:, :-1].bool()
    lp = logprobs_chunked(h[:, :-1][keep], model.lm_head.weight, input_ids[:, 1:][keep], temperature, chunk, compiled)
    return lp.new_zeros(keep.shape).masked_scatter(keep, lp)  # (B, T-1) fp32, 0 at masked positions


def sequence_logprobs(model, input_ids, attention_mask, response_mask, temperature=1.0, compiled=False):
    """log π(y|x) = Σ_t log π(y_t | x, y_<t) over the response tokens: (B,) fp32 (DPO's sequence log-prob)."""
    return token_logprobs(model, input_ids, attention_mask, response_mask, temperature, compiled=compiled).sum(-1)


def last_token_rewards(rm, input_ids, attention_mask, position_ids=None, last=None):
    """A reward model's scalar score, read at the last real token of each row (right or left padded; at a pad token,
    SmolLM2's EOS too, it would score the wrong text): (B,), or at `last`, indices into the (B·T,) flattened positions
    (prompt-shared rows). In fp32 even under bf16 autocast, which would round each reward to 8 significant bits."""
    hidden = rm(input_ids, attention_mask, position_ids=position_ids, return_hidden=True)  # (B, T, C)
    if last is None:
        last = torch.arange(len(hidden), device=hidden.device) * hidden.shape[1] + last_token_index(attention_mask)
    with torch.autocast(hidden.device.type, enabled=False):
        return rm.score(hidden.flatten(0, 1)[last].float()).squeeze(-1)
