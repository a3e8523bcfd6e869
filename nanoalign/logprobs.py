"""Per-token log-probs from final hidden states: the hot loop of every alignment loss.

    logp_t = h_t·W[y_t]/T − logsumexp(h_t·Wᵀ/T)

The textbook path (`logprobs_naive`) builds the (B, T, V) logits tensor; at SmolLM2 sizes (8 × 512 × 49,152) that
is 0.8 GB in fp32, and its log_softmax, gradient and softmax-gradient are three more. `logprobs_chunked` walks the
B·T tokens in chunks, keeps only one (chunk, V) block alive at a time, and computes in fp32 even under bf16
autocast (pitfall 4). Its backward recomputes each chunk's softmax instead of storing it:

    ∂logp_t/∂h_t = (W[y_t] − softmax_t·W) / T        ∂logp_t/∂W = (onehot(y_t) − softmax_t)ᵀ h_t / T

When W is frozen (LoRA, QLoRA) the h-gradient factor is computed in the forward pass instead, so the backward is
just a scale by the upstream gradient and the lm_head costs two matmuls, the same as the naive path.
The per-chunk kernels can be torch.compile'd (`compiled=True`); shapes are marked dynamic, so varied lengths reuse
one graph. Eager is the default because compiling costs seconds to warm up.
"""
import torch
from .model import last_token_index


def logprobs_naive(hidden, weight, labels, temperature: float = 1.0):
    """The reference: hidden (..., C), weight (V, C), labels (...) -> log p(labels) (...), fp32."""
    with torch.autocast(hidden.device.type, enabled=False):
        dtype = torch.promote_types(hidden.dtype, torch.float32)
        logits = hidden.to(dtype) @ weight.to(dtype).T / temperature  # (..., V)
        return torch.log_softmax(logits, dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


# ---- per-chunk kernels. They work IN PLACE on a (n, V) block of logits, so one buffer, allocated once per pass,
# serves every chunk: no temporaries, and no fresh pages to fault in per chunk (that alone was ~15% of the CPU time
# of a step at SmolLM2 sizes). The matmul stays outside the kernels because it writes into that buffer (`out=`);
# on CPU inductor would call the same GEMM anyway.

def _logsumexp_(logits):
    """logsumexp over the vocabulary (n,), in place: logits (n, V) is left holding exp(logits − max)."""
    m = logits.amax(dim=-1)  # subtract the row max so exp never overflows
    return logits.sub_(m[:, None]).exp_().sum(dim=-1).log_().add_(m)


def _logsumexp(logits):
    """The same for inductor, which fuses it into one read-only pass (an in-place chain makes it keep a temporary)."""
    return torch.logsumexp(logits, dim=-1)


def _scaled_softmax_(logits, lse, g):
    """g_t·softmax_t (n, V) from the logsumexp, written over logits."""
    return logits.sub_(lse[:, None]).exp_().mul_(g[:, None])


_compiled = []


def _kernels(compiled: bool):
    """(logsumexp kernel, scaled-softmax kernel), eager or torch.compile'd."""
    if not compiled:
        return _logsumexp_, _scaled_softmax_
    if not _compiled:  # dynamic=True: the chunk length (and V) are symbolic, so new lengths don't recompile
        _compiled.extend(torch.compile(fn, dynamic=True) for fn in (_logsumexp, _scaled_softmax_))
    return tuple(_compiled)


def _chunks(n: int, chunk: int):
    """Split n tokens into near-equal chunks of at most `chunk` (never a size-1 tail, which would recompile)."""
    k = max(1, -(-n // chunk))
    bounds = [round(i * n / k) for i in range(k + 1)]
    return [(bounds[i], bounds[i + 1]) for i in range(k) if bounds[i + 1] > bounds[i]]


class ChunkedLogprobs(torch.autograd.Function):
    """logp (N,) of labels (N,) under softmax(hidden (N, C) · weight (V, C)ᵀ), one token chunk at a time."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk: int, compiled: bool, precompute_grad_h: bool):
        hidden, weight = hidden.detach(), weight.detach()  # same requires_grad flags every call: no recompiles
        N = hidden.shape[0]
        lse_fn, softmax_fn = _kernels(compiled)
        w_y = weight[labels]  # (N, C): the label rows W[y_t]
        lse = hidden.new_empty(N)
        grad_h = torch.empty_like(hidden) if precompute_grad_h else None
        buf = hidden.new_empty(min(chunk, N), weight.shape[0])  # the one (chunk, V) block
        for s, e in _chunks(N, chunk):
            logits = torch.mm(hidden[s:e], weight.T, out=buf[: e - s])  # (n, V)
            if precompute_grad_h:  # frozen W: ∂logp_t/∂h_t = W[y_t] − softmax_t·W is known now
                lse[s:e] = torch.logsumexp(logits, dim=-1)
                grad_h[s:e] = w_y[s:e] - softmax_fn(logits, lse[s:e], hidden.new_ones(e - s)) @ weight
            else:
                lse[s:e] = lse_fn(logits)
        logp = (hidden * w_y).sum(-1) - lse  # h_t·W[y_t] − logsumexp(h_t·Wᵀ)
        if precompute_grad_h:
            ctx.save_for_backward(grad_h)
        else:
            ctx.save_for_backward(hidden, weight, labels, lse)
        ctx.chunk, ctx.compiled, ctx.precomputed = chunk, compiled, precompute_grad_h
        return logp

    @staticmethod
    def backward(ctx, g):  # g (N,): upstream gradient of each token's log-prob
        if ctx.precomputed:
            (grad_h,) = ctx.saved_tensors
            return g[:, None] * grad_h, None, None, None, None, None
        hidden, weight, labels, lse = (x.detach() for x in ctx.saved_tensors)
        N = hidden.shape[0]
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight) if need_w else None
        _, softmax_fn = _kernels(ctx.compiled)
        buf = hidden.new_empty(min(ctx.chunk, N), weight.shape[0])
        with torch.autocast(hidden.device.type, enabled=False):
            for s, e in _chunks(N, ctx.chunk):
                h, y, gs = hidden[s:e], labels[s:e], g[s:e].contiguous()
                logits = torch.mm(h, weight.T, out=buf[: e - s])  # recompute (n, V) instead of storing it
                gp = softmax_fn(logits, lse[s:e], gs)  # (n, V) = g_t·softmax_t
                if need_h:
                    grad_h[s:e] = gs[:, None] * weight[y] - gp @ weight  # g_t·(W[y_t] − softmax_t·W)
                if need_w:
                    grad_w.addmm_(gp.T, h, alpha=-1.0)  # − Σ_t g_t·softmax_tᵀ h_t, accumulated in place
                    grad_w.index_add_(0, y, gs[:, None] * h)  # + Σ_t g_t·onehot(y_t)ᵀ h_t
        return grad_h, grad_w, None, None, None, None


def logprobs_chunked(hidden, weight, labels, temperature: float = 1.0, chunk: int = 128, compiled: bool = False):
    """hidden (..., C), weight (V, C), labels (...) -> log p(labels) (...) in fp32 (fp64 for fp64 inputs).

    Equal to `logprobs_naive` but never builds the (..., V) logits; peak extra memory is about chunk × V floats
    (25 MB at 128 × 49,152: measured on a LoRA-DPO step of SmolLM2, 170 MB less peak RSS than chunks of 512, for
    ~12% more time in this op alone).
    """
    shape = labels.shape
    dtype = torch.promote_types(hidden.dtype, torch.float32)
    with torch.autocast(hidden.device.type, enabled=False):
        # logits/T = (h/T)·Wᵀ: scaling the (N, C) hidden is cheaper than the (N, V) logits, and autograd carries 1/T
        h = hidden.reshape(-1, hidden.shape[-1]).to(dtype) / temperature  # (N, C)
        w = weight.to(dtype)
        precompute = torch.is_grad_enabled() and h.requires_grad and not w.requires_grad
        logp = ChunkedLogprobs.apply(h, w, labels.reshape(-1), chunk, compiled, precompute)
    return logp.view(shape)


def token_logprobs(model, input_ids, attention_mask=None, labels_mask=None, temperature: float = 1.0,
                   position_ids=None, chunk: int = 128, compiled: bool = False):
    """Log-probs of each next token: entry t of the (B, T-1) result is log p(input_ids[t+1] | input_ids[≤t]) / T.

    input_ids, attention_mask (B, T): 1 = real token, 0 = padding (by position, never by id: SmolLM2 pads with EOS).
        A packed batch passes its (B, 1, T, T) mask and position_ids instead (nanoalign.packing).
    labels_mask (B, T): 1 on the tokens whose log-prob you need (e.g. the response mask from render_chat), aligned
        with input_ids; the result is 0 where it is 0, and those positions skip the lm_head entirely.
        Padding and a target whose context is all padding are masked too.
    temperature: the sampling temperature; RL log-probs must be taken at it (TRL #3029).
    """
    B, T = input_ids.shape
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    hidden = model(input_ids, attention_mask, position_ids=position_ids, return_hidden=True)
    if attention_mask.dim() == 2:
        am = attention_mask.bool()
        keep = am[:, 1:] & am[:, :-1]  # (B, T-1): target and its context are real tokens
        if labels_mask is not None:
            keep = keep & labels_mask[:, 1:].bool()
    else:  # packed: the labels mask is 0 on padding and at each document's first token
        keep = labels_mask[:, 1:].bool()
    # only the kept positions go through the lm_head: prompts and padding cost nothing
    sel = hidden[:, :-1][keep]  # (K, C)
    logp = logprobs_chunked(sel, model.lm_head.weight, input_ids[:, 1:][keep], temperature, chunk, compiled)
    out = logp.new_zeros(B, T - 1)
    return out.masked_scatter(keep, logp)  # (B, T-1) fp32, 0 at masked positions


def sequence_logprobs(model, input_ids, attention_mask, response_mask, temperature: float = 1.0,
                      compiled: bool = False):
    """log π(y|x) = Σ_t log π(y_t | x, y_<t) over the response tokens: (B,) fp32 (DPO's sequence log-prob)."""
    return token_logprobs(model, input_ids, attention_mask, response_mask, temperature, compiled=compiled).sum(-1)


def last_token_rewards(rm, input_ids, attention_mask):
    """A reward model's scalar score (B,) fp32, read at the last real token of each row (right or left padded).
    Reading it anywhere else (e.g. at a pad token, which for SmolLM2 is also its EOS) scores the wrong text."""
    hidden = rm(input_ids, attention_mask, return_hidden=True)  # (B, T, C)
    last = last_token_index(attention_mask)  # (B,)
    return rm.score(hidden[torch.arange(len(last), device=hidden.device), last].float()).squeeze(-1).float()
