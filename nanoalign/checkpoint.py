"""HF-compatible checkpoints, atomic writes, and the train state that makes --resume bit-exact.

A checkpoint directory is an ordinary Hugging Face directory of the model's own family (config.json, model.safetensors
with HF key names, tokenizer.json, tokenizer_config.json), so `transformers` loads it as that family. Every file is
written to a temporary name, fsync'd, then os.replace'd: a crash never leaves a half-written file behind."""
import json
import os
import pathlib
import random

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .cli import UserError, check
from .model import ModelConfig, Transformer
from .tokenizer import Tokenizer


def atomic_write(path: str, write_fn):  # write_fn(tmp_path), fsync it, rename it over `path`
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        write_fn(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # a failed write leaves the previous file and no half-written temporary behind
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_json(path: str, obj):
    text = json.dumps(obj, indent=2)  # (a value JSON cannot hold fails here, before any file is touched)
    atomic_write(path, lambda tmp: pathlib.Path(tmp).write_text(text))


def save_checkpoint(out_dir: str, model: Transformer, tokenizer: Tokenizer):
    """Write config.json, model.safetensors (fp32) and the tokenizer files into out_dir, each atomically."""
    os.makedirs(out_dir, exist_ok=True)
    sd = {k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype).contiguous()
          for k, v in model.state_dict().items()}
    if model.score is not None or model.cfg.tie_word_embeddings:  # a tied lm_head is the embedding; an RM has none
        sd.pop("lm_head.weight")
    cfg = {**model.cfg.to_hf(reward=model.score is not None), "torch_dtype": "float32",
           "eos_token_id": tokenizer.eos_id}  # generation stops at the template's end of turn
    if model.score is not None and cfg["pad_token_id"] == tokenizer.eos_id:  # transformers scores the last token
        endoftext = tokenizer.tok.token_to_id("<|endoftext|>")  # that is not pad_token_id: never the end of turn
        cfg["pad_token_id"] = model.cfg.bos_token_id if endoftext is None else endoftext
    atomic_write(os.path.join(out_dir, "tokenizer.json"), tokenizer.tok.save)
    write_json(os.path.join(out_dir, "tokenizer_config.json"), tokenizer.config)
    atomic_write(os.path.join(out_dir, "model.safetensors"), lambda tmp: save_file(sd, tmp, metadata={"format": "pt"}))
    write_json(os.path.join(out_dir, "config.json"), cfg)
    fd = os.open(out_dir, os.O_RDONLY)  # and the renames themselves reach the disk
    os.fsync(fd)
    os.close(fd)


def read_config(path: str) -> dict:
    cfg_path = os.path.join(path, "config.json")
    check(os.path.exists(cfg_path), f"{cfg_path}: missing config.json (not a model directory)")
    try:
        d = json.loads(pathlib.Path(cfg_path).read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{cfg_path}: not a valid config ({e})")
    check(isinstance(d, dict), f"{cfg_path}: not a valid config (not a JSON object)")
    return d


def read_weights(path: str) -> dict:
    """model.safetensors, or HF's sharded model-0000x-of-0000y.safetensors with an index."""
    files, index = [os.path.join(path, "model.safetensors")], os.path.join(path, "model.safetensors.index.json")
    if not os.path.exists(files[0]) and os.path.exists(index):
        try:
            with open(index) as f:
                files = sorted({os.path.join(path, str(v)) for v in json.load(f)["weight_map"].values()})
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise UserError(f"{index}: not a valid weights index ({type(e).__name__}: {e})")
    sd = {}
    for fp in files:
        check(os.path.exists(fp), f"{fp}: missing weights file")
        try:
            sd.update(load_file(fp))
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise UserError(f"{fp}: corrupt or truncated safetensors file ({str(e).splitlines()[0][:100]})")
    return sd


def build_model(cfg_dict: dict, sd: dict, where: str) -> Transformer:
    """An HF config and state dict -> Transformer. A weight missing, unexpected or of the wrong shape is a UserError:
    dropping one (say Qwen2's q/k/v biases) would give wrong logits without a word."""
    gguf = where.endswith(".gguf")
    cfg_file, w_file = (where, where) if gguf else (f"{where}/config.json", f"{where}/model.safetensors")
    try:
        cfg = ModelConfig.from_hf(cfg_dict)
    except (TypeError, ValueError) as e:
        raise UserError(f"{cfg_file}: {e}")
    model = Transformer(cfg)  # (plain CPU init: the meta device would pull in torch._dynamo, slower overall)
    if "ForSequenceClassification" in str(cfg_dict.get("architectures")):  # a reward model
        model.add_score_head()
    expected = model.state_dict()
    if cfg.tie_word_embeddings or model.score is not None:  # the embedding, or unused by a reward model
        expected.pop("lm_head.weight")
    unexpected = sorted(k for k in set(sd) - set(expected) - {"lm_head.weight"} if "rotary_emb.inv_freq" not in k)
    if unexpected:
        raise UserError(f"{w_file}: unexpected weight {unexpected[0]} ({len(unexpected)} in all) for a "
                        f"{cfg.model_type} model of this config")
    missing = sorted(set(expected) - set(sd))
    if missing:
        raise UserError(f"{w_file}: missing weight {missing[0]} ({len(missing)} missing in all)")
    for k, v in expected.items():
        check(sd[k].shape == v.shape, f"{cfg_file}: shapes disagree with the weights: {k} is {tuple(sd[k].shape)}, "
              f"the config implies {tuple(v.shape)}")
    model.load_state_dict({k: sd[k].float() for k in expected}, strict=False)
    return model


def load_checkpoint(path: str) -> tuple[Transformer, Tokenizer]:
    model, tok = build_model(read_config(path), read_weights(path), path), Tokenizer.from_dir(path)
    check(tok.vocab_size <= model.cfg.vocab_size, f"{path}/tokenizer.json: vocabulary of {tok.vocab_size} tokens "
          f"does not fit the model's embedding of {model.cfg.vocab_size}")
    return model, tok


# --- train state for --resume ----------------------------------------------------------------------------------
def rng_state() -> dict:
    """Every RNG as tensors/ints, so torch.load(weights_only=True) can read it back (no numpy pickles)."""
    (v, state, gauss), n = random.getstate(), np.random.get_state()
    return {"python": [v, list(state), gauss], "numpy": [n[0], torch.from_numpy(n[1].astype(np.int64)), *n[2:]],
            "torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(st: dict):
    (v, state, gauss), n = st["python"], st["numpy"]
    random.setstate((v, tuple(state), gauss))
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), *n[2:]))
    torch.set_rng_state(st["torch"])
    if st.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def save_train_state(out_dir: str, state: dict):
    """Write OUT/train_state.pt atomically (state: tensors, numbers, lists, dicts only)."""
    atomic_write(os.path.join(out_dir, "train_state.pt"), lambda tmp: torch.save(state, tmp))


def load_train_state(out_dir: str) -> dict:
    path = os.path.join(out_dir, "train_state.pt")
    check(os.path.exists(path), f"{path}: no train state to resume from")
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:  # torch raises several types for a damaged zip/pickle
        raise UserError(f"{path}: corrupt train state ({str(e).splitlines()[0][:100]})")
