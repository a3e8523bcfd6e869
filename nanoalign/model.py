"""One readable Llama-family transformer: Llama 2/3.x, SmolLM2, Mistral, Qwen2/2.5 and Qwen3.

RMSNorm -> grouped-query attention with rotary embeddings -> RMSNorm -> SwiGLU MLP, pre-norm residual. The families
differ in a few switches read from config.json: Qwen2's q/k/v biases, Qwen3's per-head q/k RMSNorm and free head_dim,
Llama 3.1's 'llama3' RoPE scaling, Mistral's sliding window. Names follow Hugging Face (`model.layers.N.self_attn.
q_proj`), so a state dict is an HF checkpoint; LoRA, NF4 and the speed-ups are module swaps done from outside.
"""
import math
import numbers
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

FAMILIES = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}  # model_type -> HF class
LLAMA3_ROPE = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


@dataclass
class ModelConfig:
    vocab_size: int = 49152
    hidden_size: int = 576
    intermediate_size: int = 1536
    num_hidden_layers: int = 30
    num_attention_heads: int = 9
    num_key_value_heads: int = 3
    head_dim: int = 0  # 0: hidden_size // num_attention_heads
    rope_theta: float = 100000.0
    rope_scaling: dict | None = None  # {"rope_type": "llama3", and the LLAMA3_ROPE values}, or None: plain RoPE
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 8192
    sliding_window: int = 0  # 0: full causal attention
    tie_word_embeddings: bool = True
    model_type: str = "llama"
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 2

    def __post_init__(self):
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads

    def to_hf(self, reward: bool = False) -> dict:
        """config.json for transformers: the family's *ForCausalLM, or *ForSequenceClassification for a reward model."""
        arch = FAMILIES[self.model_type] + ("ForSequenceClassification" if reward else "ForCausalLM")
        rope = {"rope_type": "default", **(self.rope_scaling or {}), "rope_theta": self.rope_theta}  # transformers 5
        d = dict(asdict(self), architectures=[arch], rope_parameters=rope, sliding_window=self.sliding_window or None)
        return {**d, "num_labels": 1, "id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0}} if reward else d

    @classmethod
    def from_hf(cls, d: dict) -> "ModelConfig":
        family, rope = d.get("model_type", "llama"), d.get("rope_parameters") or d.get("rope_scaling") or {}
        rope = rope if isinstance(rope, dict) else {"rope_type": rope}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if family not in FAMILIES:
            raise ValueError(f"model_type {family!r} is not supported (supported: {', '.join(FAMILIES)})")
        if rope_type not in ("default", "llama3"):
            raise ValueError(f"rope type {rope_type!r} is not supported (supported: default, llama3)")
        llama3 = {k: rope.get(k) for k in LLAMA3_ROPE} if rope_type == "llama3" else None
        if llama3 and not all(isinstance(v, numbers.Real) and v > 0 for v in llama3.values()):
            raise ValueError(f"rope type llama3 needs positive {', '.join(LLAMA3_ROPE)}")
        if d.get("use_sliding_window"):  # Qwen's per-layer windows (Mistral's plain sliding_window is supported)
            raise ValueError("use_sliding_window is not supported (only Mistral's sliding_window)")
        kw = {f.name: d[f.name] for f in fields(cls) if d.get(f.name) is not None}
        kw["rope_scaling"] = llama3 and {"rope_type": "llama3", **llama3}
        kw.setdefault("rope_theta", rope.get("rope_theta", cls.rope_theta))
        kw.setdefault("num_key_value_heads", kw.get("num_attention_heads", cls.num_attention_heads))
        if family != "mistral":  # Qwen writes a window that it uses only with use_sliding_window
            kw.pop("sliding_window", None)
        kw.update({k: v[0] for k, v in kw.items() if k.endswith("token_id") and isinstance(v, list) and v})  # lists
        for k, v in kw.items():  # a hand-edited config.json fails here, naming its key, not deep inside the model
            kind, low = type(getattr(cls, k)), 0 if k.endswith("token_id") or not getattr(cls, k) else 1e-30
            ok = isinstance(v, bool) if kind is bool else kind not in (int, float) or (not isinstance(v, bool) and
                isinstance(v, numbers.Integral if kind is int else numbers.Real) and math.isfinite(v) and v >= low)
            if not ok:
                want = "true or false" if kind is bool else f"a {'positive' if low else 'non-negative'} {kind.__name__}"
                raise ValueError(f"{k} must be {want}, got {v!r}")
        cfg = cls(**kw)
        if cfg.num_attention_heads % cfg.num_key_value_heads or cfg.hidden_size % cfg.num_attention_heads and not \
                kw.get("head_dim"):
            raise ValueError("num_attention_heads must divide by num_key_value_heads, and hidden_size by "
                             "num_attention_heads unless head_dim is given")
        return cfg


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)


def rms_norm(x, weight, eps: float):  # normalise in fp32, as HF does, then cast back (matters under bf16)
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def rope_frequencies(cfg: ModelConfig):
    """RoPE's inverse frequencies theta^(-2i/D), (head_dim/2,); Llama 3.1's scaling if the config asks for it."""
    D = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, D, 2, dtype=torch.float32) / D))
    if s := cfg.rope_scaling:  # Llama 3.1: wavelengths over context/low_freq_factor are stretched by `factor`,
        # those under context/high_freq_factor kept, the ones between interpolated
        wavelen = 2 * math.pi / inv_freq
        low, high = s["low_freq_factor"], s["high_freq_factor"]
        smooth = ((s["original_max_position_embeddings"] / wavelen - low) / (high - low)).clamp(0, 1)
        inv_freq = (1 - smooth) * inv_freq / s["factor"] + smooth * inv_freq
    return inv_freq


def apply_rope(x, cos, sin):  # x: (B, H, T, D); cos/sin: (B, 1, T, D)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos.to(x.dtype) + torch.cat((-x2, x1), dim=-1) * sin.to(x.dtype)


def swiglu(gate, up):
    return F.silu(gate) * up


class KVCache(nn.Module):
    """A preallocated cache (gpt-fast style): forward writes new keys/values at `cache_pos`."""
    def __init__(self, batch: int, max_len: int, n_kv_heads: int, head_dim: int, dtype, device):
        super().__init__()
        for name in ("k", "v"):  # buffers: torch.compile tracks their in-place writes
            self.register_buffer(name, torch.zeros(batch, n_kv_heads, max_len, head_dim, dtype=dtype, device=device),
                                 persistent=False)

    def update(self, cache_pos, k, v):  # cache_pos: (T,) positions in the buffer; k, v: (B, Hkv, T, D)
        self.k.index_copy_(2, cache_pos, k.to(self.k.dtype))
        self.v.index_copy_(2, cache_pos, v.to(self.v.dtype))
        return self.k, self.v


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        H, Hkv, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.n_heads, self.n_kv, self.head_dim = H, Hkv, D
        bias = cfg.model_type == "qwen2"  # Qwen2's q/k/v projections carry a bias; its o_proj does not
        self.q_proj = nn.Linear(cfg.hidden_size, H * D, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, Hkv * D, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, Hkv * D, bias=bias)
        self.o_proj = nn.Linear(H * D, cfg.hidden_size, bias=False)
        # Qwen3 RMS-normalises each head's q and k before RoPE, which keeps the attention logits bounded
        self.q_norm, self.k_norm = (RMSNorm(D, cfg.rms_norm_eps) if cfg.model_type == "qwen3" else None for _ in "qk")
        self.kv_cache: KVCache | None = None

    def qkv(self, x):  # (B, T, C) -> q, k, v; nanoalign.fast's sampling copy swaps in one matmul for the three
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def forward(self, x, cos, sin, mask, cache_pos=None):
        B, T, C = x.shape
        H, Hkv, D = self.n_heads, self.n_kv, self.head_dim
        q, k, v = self.qkv(x)
        q, k, v = q.view(B, T, H, D), k.view(B, T, Hkv, D), v.view(B, T, Hkv, D)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = apply_rope(q.transpose(1, 2), cos, sin), apply_rope(k.transpose(1, 2), cos, sin), v.transpose(1, 2)
        if self.kv_cache is not None and cache_pos is not None:
            k, v = (t.to(q.dtype) for t in self.kv_cache.update(cache_pos, k, v))  # (B, Hkv, S, D): the whole buffer
        # grouped-query attention: each kv head serves rep = n_heads / n_kv query heads. Fold those heads into the
        # query length, (B, Hkv, rep*T, D), so K and V are never copied rep times (it matters when decoding)
        rep = H // Hkv
        q = q.reshape(B, Hkv, rep * T, D)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask if T == 1 else mask.repeat(1, 1, rep, 1))
        return self.o_proj(y.view(B, H, T, D).transpose(1, 2).reshape(B, T, H * D))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):  # SwiGLU
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, cache_pos=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache_pos)
        return x + self.mlp(self.post_attention_layernorm(x))


def build_mask(attention_mask, T: int, S: int, cache_pos=None, allowed=None):
    """Boolean SDPA mask (B, 1, T, S), True where a query may attend to a key. attention_mask: (B, S) 1 on real
    tokens (padding by position, never by id: pad is often EOS); cache_pos: (T,) the queries' KV-cache positions;
    allowed: an optional (B, T, S) bool restricting attention further (packed rows, nanoalign.packing)."""
    device = attention_mask.device
    q_pos = cache_pos if cache_pos is not None else torch.arange(T, device=device)
    causal = q_pos[:, None] >= torch.arange(S, device=device)[None, :]  # (T, S)
    mask = causal[None] & attention_mask[:, None, :].bool()  # (B, T, S)
    if allowed is not None:
        mask = mask & allowed
    # a fully padded query row would give NaN in SDPA; let it see itself (its output is masked out anyway)
    eye = q_pos[:, None] == torch.arange(S, device=device)[None, :]
    return (mask | eye[None])[:, None]


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.model = nn.ModuleDict(dict(  # the trunk, named as HF's `model.` prefix
            embed_tokens=nn.Embedding(cfg.vocab_size, cfg.hidden_size),
            layers=nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers)),
            norm=RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)))
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.score: nn.Linear | None = None  # scalar head of a reward model (HF *ForSequenceClassification)

    @torch.no_grad()
    def init_weights(self, seed: int = 0, std: float = 0.02):
        g = torch.Generator().manual_seed(seed)
        for name, p in self.named_parameters():  # norms at 1, the rest N(0, std²) in parameter order
            p.copy_(torch.ones_like(p) if name.endswith("norm.weight") else torch.randn(p.shape, generator=g) * std)
        return self

    def add_score_head(self, std: float | None = None, seed: int = 0):
        """Attach a scalar reward head; std 1/sqrt(d+1) as in Ziegler et al. / lm-human-preferences."""
        d, g = self.cfg.hidden_size, torch.Generator().manual_seed(seed)
        self.score = nn.Linear(d, 1, bias=False).to(self.model.norm.weight.device)
        with torch.no_grad():
            self.score.weight.copy_(torch.randn(1, d, generator=g) * (std if std is not None else 1 / math.sqrt(d + 1)))
        return self.score

    def setup_cache(self, batch: int, max_len: int, dtype=None, device=None):
        p = self.model.norm.weight
        for layer in self.model.layers:
            layer.self_attn.kv_cache = KVCache(batch, max_len, self.cfg.num_key_value_heads, self.cfg.head_dim,
                                               dtype or p.dtype, device or p.device)

    def clear_cache(self):
        for layer in self.model.layers:
            layer.self_attn.kv_cache = None

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache_pos=None, return_hidden: bool = False):
        """input_ids (B, T) -> logits (B, T, V), or final-normed hidden states (B, T, C) with return_hidden.
        attention_mask: (B, T) 1 = real token; (B, S) over the KV cache when decoding at cache_pos (T,); or a ready
        (B, 1, T, T) bool mask (packed rows, with position_ids). Default positions count real tokens: left padding."""
        B, T = input_ids.shape
        if attention_mask is None:
            S = T if cache_pos is None else self.model.layers[0].self_attn.kv_cache.k.shape[2]
            attention_mask = torch.ones(B, S, dtype=torch.long, device=input_ids.device)
        if position_ids is None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, S)
            if cache_pos is not None:  # the positions of the cache slots being written
                position_ids = position_ids.gather(1, cache_pos[None].expand(B, -1))
        x = self.model.embed_tokens(input_ids)  # (B, T, C)
        inv_freq = rope_frequencies(self.cfg).to(position_ids.device)  # (D/2,)
        freqs = position_ids.float()[:, None, :, None] * inv_freq  # (B, 1, T, D/2): RoPE's angles
        emb = torch.cat((freqs, freqs), dim=-1)  # (B, 1, T, D), the HF 'rotate_half' layout of apply_rope
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        mask = attention_mask if attention_mask.dim() == 4 else build_mask(attention_mask, T, attention_mask.shape[1],
                                                                           cache_pos)
        if self.cfg.sliding_window:  # Mistral: only keys less than sliding_window positions back (by position, so
            k_pos = position_ids if cache_pos is None else attention_mask.cumsum(-1) - 1  # packed rows stay exact)
            mask = mask & (position_ids[:, None, :, None] - k_pos[:, None, None, :] < self.cfg.sliding_window)
        for layer in self.model.layers:
            x = layer(x, cos, sin, mask, cache_pos)
        x = self.model.norm(x)
        return x if return_hidden else self.lm_head(x)


def last_token_index(mask):
    """Index of the last 1 in each row of a (B, T) mask: where reward and value are read."""
    pos = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return torch.where(mask.bool(), pos, -1).max(dim=1).values.clamp(min=0)


PRESETS = {  # random-init presets for tests and quick experiments, with the byte-level tokenizer (vocab 259)
    "tiny": dict(vocab_size=259, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=1024, rope_theta=10000.0),
    "small": dict(vocab_size=259, hidden_size=192, intermediate_size=512, num_hidden_layers=4, num_attention_heads=6,
                  num_key_value_heads=2, max_position_embeddings=2048, rope_theta=10000.0),
}
