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


# The eager kernels work IN PLACE on the (n, V) logits, so one buffer per pass serves every chunk: no temporaries.
def _logsumexp_(logits):  # -> (n,); logits (n, V) is left holding exp(logits − max)
    m = logits.amax(dim=-1)  # subtract the row max so exp never overflows
    return logits.sub_(m[:, None]).exp_().sum(dim=-1).log_().add_(m)


def _logsumexp(logits):  # for compiled=True: inductor fuses the read-only form into one loop (dynamic shapes)
    return torch.logsumexp(logits, dim=-1)


def _scaled_softmax_(logits, lse, g):  # g_t·softmax_t (n, V) from the logsumexp, written over logits
    return logits.sub_(lse[:, None]).exp_().mul_(g[:, None])


def _chunks(n: int, chunk: int):  # near-equal chunks of at most `chunk` tokens (a size-1 tail would recompile)
    k = max(1, -(-n // chunk))
    b = [round(i * n / k) for i in range(k + 1)]
    return [(s, e) for s, e in zip(b, b[1:]) if e > s]


class ChunkedLogprobs(torch.autograd.Function):
    """logp (N,) of labels (N,) under softmax(hidden (N, C) · weight (V, C)ᵀ), one token chunk at a time."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk: int, kernels, precompute_grad_h: bool):
        hidden, weight = hidden.detach(), weight.detach()  # same requires_grad flags every call: no recompiles
        (lse_fn, softmax_fn), w_y = kernels, weight[labels]  # w_y (N, C): the label rows W[y_t]
        lse, grad_h = hidden.new_empty(hidden.shape[0]), torch.empty_like(hidden) if precompute_grad_h else None
        buf = hidden.new_empty(min(chunk, hidden.shape[0]), weight.shape[0])  # the one (chunk, V) block
        for s, e in _chunks(hidden.shape[0], chunk):
            logits = torch.mm(hidden[s:e], weight.T, out=buf[: e - s])  # (n, V)
            if precompute_grad_h:  # frozen W: ∂logp_t/∂h_t = W[y_t] − softmax_t·W is known now
                lse[s:e] = torch.logsumexp(logits, dim=-1)
                grad_h[s:e] = w_y[s:e] - softmax_fn(logits, lse[s:e], hidden.new_ones(e - s)) @ weight
            else:
                lse[s:e] = lse_fn(logits)
        ctx.save_for_backward(*((grad_h,) if precompute_grad_h else (hidden, weight, labels, lse)))
        ctx.chunk, ctx.softmax_fn, ctx.precomputed = chunk, softmax_fn, precompute_grad_h
        return (hidden * w_y).sum(-1) - lse  # h_t·W[y_t] − logsumexp(h_t·Wᵀ)

    @staticmethod
    def backward(ctx, g):  # g (N,): upstream gradient of each token's log-prob
        if ctx.precomputed:
            return g[:, None] * ctx.saved_tensors[0], None, None, None, None, None
        hidden, weight, labels, lse = ctx.saved_tensors  # W trains here (else precomputed), and h does in practice
        grad_h, grad_w = torch.empty_like(hidden), torch.zeros_like(weight)
        buf = hidden.new_empty(min(ctx.chunk, hidden.shape[0]), weight.shape[0])
        with torch.autocast(hidden.device.type, enabled=False):
            for s, e in _chunks(hidden.shape[0], ctx.chunk):
                h, y, gs = hidden[s:e], labels[s:e], g[s:e].contiguous()
                logits = torch.mm(h, weight.T, out=buf[: e - s])  # recompute (n, V) instead of storing it
                gp = ctx.softmax_fn(logits, lse[s:e], gs)  # (n, V) = g_t·softmax_t
                grad_h[s:e] = gs[:, None] * weight[y] - gp @ weight  # g_t·(W[y_t] − softmax_t·W)
                grad_w.addmm_(gp.T, h, alpha=-1.0)  # − Σ_t g_t·softmax_tᵀ h_t, accumulated in place
                grad_w.index_add_(0, y, gs[:, None] * h)  # + Σ_t g_t·onehot(y_t)ᵀ h_t
        return grad_h, grad_w, None, None, None, None


def logprobs_chunked(hidden, weight, labels, temperature: float = 1.0, chunk: int = 128, compiled: bool = False):
    """hidden (..., C), weight (V, C), labels (...) -> log p(labels) (...) in fp32 (fp64 for fp64 inputs). Equal to
    `logprobs_naive`, but the extra memory is one (chunk, V) block: 25 MB at 128 × 49,152 in fp32."""
    fns = [fast.compiled(f) for f in (_logsumexp, _scaled_softmax_)] if compiled else (_logsumexp_, _scaled_softmax_)
    with torch.autocast(hidden.device.type, enabled=False):
        # logits/T = (h/T)·Wᵀ: scaling the (N, C) hidden is cheaper than the (N, V) logits, and autograd carries 1/T
        h = hidden.reshape(-1, hidden.shape[-1]).to(torch.promote_types(hidden.dtype, torch.float32)) / temperature
        precompute = torch.is_grad_enabled() and h.requires_grad and not weight.requires_grad
        logp = ChunkedLogprobs.apply(h, weight.to(h.dtype), labels.reshape(-1), chunk, fns, precompute)
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
