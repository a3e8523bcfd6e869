"""One readable Llama-family transformer (SmolLM2, Llama 2/3, TinyLlama, ...).

RMSNorm -> grouped-query attention with rotary embeddings -> RMSNorm -> SwiGLU MLP, pre-norm residual.
Module and parameter names follow Hugging Face (`model.layers.N.self_attn.q_proj`), so a state dict is an HF
checkpoint and LoRA targets mean what they mean in PEFT. LoRA and NF4 are applied from outside by module swap,
so this file stays a plain Llama.
"""
import math
import numbers
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class ModelConfig:
    vocab_size: int = 49152
    hidden_size: int = 576
    intermediate_size: int = 1536
    num_hidden_layers: int = 30
    num_attention_heads: int = 9
    num_key_value_heads: int = 3
    rope_theta: float = 100000.0
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = True
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 2

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def to_hf(self, architecture: str = "LlamaForCausalLM") -> dict:
        d = asdict(self)
        d.update(architectures=[architecture], model_type="llama", hidden_act="silu", attention_bias=False,
                 mlp_bias=False, head_dim=self.head_dim, torch_dtype="float32", rope_scaling=None,
                 rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta})  # transformers >= 5
        if architecture == "LlamaForSequenceClassification":
            d["num_labels"] = 1
            d["id2label"], d["label2id"] = {"0": "LABEL_0"}, {"LABEL_0": 0}
        return d

    @classmethod
    def from_hf(cls, d: dict) -> "ModelConfig":
        if d.get("model_type", "llama") not in ("llama", "mistral", "qwen2"):
            raise ValueError(f"unsupported model_type {d.get('model_type')!r} (only Llama-family models)")
        kw = {f.name: d[f.name] for f in fields(cls) if d.get(f.name) is not None}
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        if not isinstance(rope, dict) or rope.get("rope_type", "default") not in ("default", None):
            raise ValueError(f"rope scaling {rope.get('rope_type') if isinstance(rope, dict) else rope!r} is not "
                             "supported")
        if "rope_theta" not in kw and rope.get("rope_theta") is not None:
            kw["rope_theta"] = rope["rope_theta"]
        kw.setdefault("num_key_value_heads", kw.get("num_attention_heads", cls.num_attention_heads))
        for k in ("bos_token_id", "eos_token_id", "pad_token_id"):  # HF allows lists; we use the first id
            if isinstance(kw.get(k), list):
                kw[k] = kw[k][0]
        cfg = cls(**kw)
        for f in fields(cfg):  # a hand-edited config.json fails here, naming its key, not deep inside the model
            v = getattr(cfg, f.name)
            if f.type is bool:
                bad, want = not isinstance(v, bool), "true or false"
            else:  # sizes > 0, token ids >= 0
                ids = f.name.endswith("token_id")
                low, want = (0, f"an {f.type.__name__} >= 0") if ids else (1e-30, f"a positive {f.type.__name__}")
                bad = (not isinstance(v, numbers.Integral if f.type is int else numbers.Real) or isinstance(v, bool)
                       or not math.isfinite(v) or v < low)
            if bad:
                raise ValueError(f"{f.name} must be {want}, got {v!r}")
        if cfg.hidden_size % cfg.num_attention_heads or cfg.num_attention_heads % cfg.num_key_value_heads:
            raise ValueError("hidden_size must divide by num_attention_heads, and that by num_key_value_heads")
        return cfg


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return _rms_norm(x, self.weight, self.eps)


def rms_norm(x, weight, eps: float):
    # normalise in fp32, as HF does, then cast back (matters under bf16)
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def rope_cos_sin(position_ids, head_dim: int, theta: float):
    """cos/sin tables for positions (B, T) -> each (B, T, head_dim), the HF 'rotate_half' layout."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float32) / head_dim))
    freqs = position_ids.float()[..., None] * inv_freq  # (B, T, head_dim/2)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x, cos, sin):  # x: (B, H, T, D); cos/sin: (B, 1, T, D)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos.to(x.dtype) + torch.cat((-x2, x1), dim=-1) * sin.to(x.dtype)


def swiglu(gate, up):
    return F.silu(gate) * up


_rms_norm, _apply_rope, _swiglu = rms_norm, apply_rope, swiglu  # what the modules call (see compile_pointwise)


def compile_pointwise():
    """The scripts' --compile: RMSNorm, RoPE and SwiGLU torch.compile'd (dynamic shapes), each one fused loop whose
    backward saves its inputs only; matmuls and attention stay eager (a whole-model compile took > 5 min on 2 cores)."""
    global _rms_norm, _apply_rope, _swiglu
    if _rms_norm is rms_norm:  # once per process
        _rms_norm, _apply_rope, _swiglu = (torch.compile(f, dynamic=True) for f in (rms_norm, apply_rope, swiglu))


class KVCache(nn.Module):
    """A preallocated cache (gpt-fast style): forward writes new keys/values at `cache_pos`."""

    def __init__(self, batch: int, max_len: int, n_kv_heads: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, cache_pos, k, v):  # cache_pos: (T,) positions in the buffer; k, v: (B, Hkv, T, D)
        self.k.index_copy_(2, cache_pos, k.to(self.k.dtype))
        self.v.index_copy_(2, cache_pos, v.to(self.v.dtype))
        return self.k, self.v


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=False)
        self.qkv_proj: nn.Module | None = None  # q, k and v in one matmul (generate.sampling_copy sets it)
        self.kv_cache: KVCache | None = None

    def forward(self, x, cos, sin, mask, cache_pos=None):
        B, T, C = x.shape
        H, Hkv, D = self.n_heads, self.n_kv, self.head_dim
        q, k, v = (self.q_proj(x), self.k_proj(x), self.v_proj(x)) if self.qkv_proj is None else \
            self.qkv_proj(x).split([H * D, Hkv * D, Hkv * D], dim=-1)
        q = _apply_rope(q.view(B, T, H, D).transpose(1, 2), cos, sin)  # (B, H, T, D)
        k = _apply_rope(k.view(B, T, Hkv, D).transpose(1, 2), cos, sin)  # (B, Hkv, T, D)
        v = v.view(B, T, Hkv, D).transpose(1, 2)
        if self.kv_cache is not None and cache_pos is not None:
            k, v = (t.to(q.dtype) for t in self.kv_cache.update(cache_pos, k, v))  # (B, Hkv, S, D): the whole buffer
        # grouped-query attention: each kv head serves rep = n_heads / n_kv query heads. Fold those heads into the
        # query length, (B, Hkv, rep*T, D), so K and V are never copied rep times (it matters when decoding)
        rep = H // Hkv
        q = q.reshape(B, Hkv, rep * T, D)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask if T == 1 else mask.repeat(1, 1, rep, 1))
        return self.o_proj(y.view(B, H, T, D).transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.gate_up_proj: nn.Module | None = None  # gate and up in one matmul (generate.sampling_copy sets it)

    def forward(self, x):  # SwiGLU
        fused = self.gate_up_proj
        gate, up = (self.gate_proj(x), self.up_proj(x)) if fused is None else fused(x).chunk(2, dim=-1)
        return self.down_proj(_swiglu(gate, up))


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


class LlamaModel(nn.Module):
    """The trunk, named as HF's `model.` prefix."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


def build_mask(attention_mask, T: int, S: int, cache_pos=None, allowed=None):
    """Boolean SDPA mask (B, 1, T, S): True where a query may attend to a key.

    attention_mask: (B, S) 1 for real tokens, 0 for padding (key padding by position, never by token id: SmolLM2's
    pad token is its EOS). cache_pos: (T,) buffer positions of the queries when decoding with a KV cache.
    allowed: an optional (B, T, S) bool that restricts attention further (e.g. packed rows, nanoalign.packing).
    """
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
        self.model = LlamaModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.score: nn.Linear | None = None  # scalar head of a reward model (HF LlamaForSequenceClassification)

    @torch.no_grad()
    def init_weights(self, seed: int = 0, std: float = 0.02):
        g = torch.Generator().manual_seed(seed)
        for name, p in self.named_parameters():  # norms at 1, the rest N(0, std²) in parameter order
            p.copy_(torch.ones_like(p) if name.endswith("norm.weight") else torch.randn(p.shape, generator=g) * std)
        return self

    def add_score_head(self, std: float | None = None, seed: int = 0):
        """Attach a scalar reward head; std 1/sqrt(d+1) as in Ziegler et al. / lm-human-preferences."""
        d = self.cfg.hidden_size
        self.score = nn.Linear(d, 1, bias=False).to(self.model.norm.weight.device)
        g = torch.Generator().manual_seed(seed)
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

        attention_mask: (B, T) 1 = real token, or (B, S) over the whole KV cache when decoding with cache_pos (T,);
        or a ready (B, 1, T, T) boolean mask (packed rows; then position_ids are required).
        position_ids default to attention_mask.cumsum(-1) - 1, which is right for left padding.
        """
        B, T = input_ids.shape
        if attention_mask is None:
            S = T if cache_pos is None else self.model.layers[0].self_attn.kv_cache.k.shape[2]
            attention_mask = torch.ones(B, S, dtype=torch.long, device=input_ids.device)
        if position_ids is None:
            if cache_pos is not None:
                position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0).gather(1, cache_pos[None].expand(B, -1))
            else:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        x = self.model.embed_tokens(input_ids)  # (B, T, C)
        cos, sin = (c[:, None].to(x.dtype) for c in rope_cos_sin(position_ids, self.cfg.head_dim, self.cfg.rope_theta))
        if attention_mask.dim() == 4:
            mask = attention_mask
        else:
            mask = build_mask(attention_mask, T, attention_mask.shape[1], cache_pos)
        for layer in self.model.layers:
            x = layer(x, cos, sin, mask, cache_pos)
        x = self.model.norm(x)
        return x if return_hidden else self.lm_head(x)


def last_token_index(mask):
    """Index of the last 1 in each row of a (B, T) mask: where reward and value are read (pitfall 6)."""
    T = mask.shape[1]
    pos = torch.arange(T, device=mask.device).expand_as(mask)
    return torch.where(mask.bool(), pos, -1).max(dim=1).values.clamp(min=0)


PRESETS = {
    # random-init presets for tests and quick experiments; "tiny" uses the byte-level tokenizer (vocab 259)
    "tiny": dict(vocab_size=259, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=1024, rope_theta=10000.0),
    "small": dict(vocab_size=259, hidden_size=192, intermediate_size=512, num_hidden_layers=4, num_attention_heads=6,
                  num_key_value_heads=2, max_position_embeddings=2048, rope_theta=10000.0),
}
