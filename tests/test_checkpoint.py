import json
import os
import random

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from nanoalign import hub
from nanoalign.checkpoint import (load_checkpoint, load_train_state, rng_state, save_checkpoint, save_train_state,
                                  set_rng_state, write_json)
from nanoalign.cli import UserError
from nanoalign.model import PRESETS, ModelConfig, Transformer

CHECKPOINT_FILES = {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"}


def ids_without(token_id, shape, seed=0):
    """Random ids that avoid `token_id` (HF's sequence classifier treats pad_token_id as padding)."""
    ids = torch.randint(3, 259, shape, generator=torch.Generator().manual_seed(seed))
    return torch.where(ids == token_id, ids + 1, ids)


@pytest.mark.parametrize("tied", [True, False])
def test_save_load_roundtrip_gives_identical_weights_and_logits(tmp_path, tied):
    model = Transformer(ModelConfig(**{**PRESETS["tiny"], "tie_word_embeddings": tied})).init_weights(seed=5).eval()
    tok = hub.load("tiny")[1]
    save_checkpoint(str(tmp_path), model, tok)
    assert set(os.listdir(tmp_path)) == CHECKPOINT_FILES  # no temporary files left behind
    back, tok2 = load_checkpoint(str(tmp_path))
    assert back.cfg == model.cfg and back.score is None
    sd, sd2 = model.state_dict(), back.state_dict()
    assert sd.keys() == sd2.keys()
    assert all(torch.equal(sd[k], sd2[k]) for k in sd)
    assert (back.lm_head.weight is back.model.embed_tokens.weight) == tied
    ids = ids_without(-1, (2, 9))
    with torch.no_grad():
        assert torch.equal(model(ids), back.eval()(ids))
    msgs = [{"role": "user", "content": "héllo"}, {"role": "assistant", "content": "ok"}]
    assert tok2.render_chat(msgs) == tok.render_chat(msgs)
    # HF key names; a tied lm_head is not stored twice
    keys = set(load_file(str(tmp_path / "model.safetensors")))
    assert "model.layers.1.self_attn.q_proj.weight" in keys and "model.embed_tokens.weight" in keys
    assert ("lm_head.weight" in keys) == (not tied)


def test_resaved_checkpoint_loads_in_transformers_with_our_tokenizer(tmp_path):
    """save -> load -> save again: the second directory still loads in transformers with the same logits."""
    transformers = pytest.importorskip("transformers")
    model, tok = hub.load("tiny")
    save_checkpoint(str(tmp_path / "a"), model, tok)
    again, tok2 = load_checkpoint(str(tmp_path / "a"))
    save_checkpoint(str(tmp_path / "b"), again, tok2)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "b"), dtype=torch.float32).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "b"))
    text = "Grüße, 世界! 42"
    assert hf_tok.encode(text, add_special_tokens=False) == tok.encode(text)
    assert (hf_tok.eos_token_id, hf_tok.pad_token_id) == (tok.eos_id, tok.pad_id)
    ids = torch.tensor([tok.render_prompt(text)])
    with torch.no_grad():
        diff = (model.eval()(ids) - hf(ids).logits).abs().max().item()
    assert diff <= 1e-4, diff


@pytest.mark.parametrize("tied", [True, False])
def test_reward_model_saves_as_sequence_classification(tmp_path, tied):
    model = Transformer(ModelConfig(**{**PRESETS["tiny"], "tie_word_embeddings": tied})).init_weights(seed=2).eval()
    model.add_score_head(seed=1)
    tok = hub.load("tiny")[1]
    save_checkpoint(str(tmp_path), model, tok)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForSequenceClassification"] and cfg["num_labels"] == 1
    # HF scores the last token that is not pad_token_id: the pad is <|endoftext|>, never the response's <|im_end|>
    assert model.cfg.pad_token_id == tok.eos_id != cfg["pad_token_id"] == tok.tok.token_to_id("<|endoftext|>")
    keys = set(load_file(str(tmp_path / "model.safetensors")))
    assert "score.weight" in keys and "lm_head.weight" not in keys
    back, _ = load_checkpoint(str(tmp_path))
    assert back.score is not None and torch.equal(back.score.weight, model.score.weight)
    ids = ids_without(model.cfg.pad_token_id, (3, 8), seed=4)
    with torch.no_grad():
        ours = model.score(model(ids, return_hidden=True))[:, -1, 0]  # (B,) the reward at the last token
        assert torch.equal(back.eval().score(back(ids, return_hidden=True))[:, -1, 0], ours)
    transformers = pytest.importorskip("transformers")
    hf = transformers.LlamaForSequenceClassification.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = hf(ids).logits[:, 0]  # HF pools at the last non-pad token: the last one here
    assert (ours - theirs).abs().max().item() <= 1e-4, (ours, theirs)


def test_sharded_weights_with_an_index_load_like_one_file(tmp_path):
    """HF's larger models ship model-0000x-of-0000y.safetensors and model.safetensors.index.json."""
    model, tok = hub.load("tiny")
    save_checkpoint(str(tmp_path), model, tok)
    sd = load_file(str(tmp_path / "model.safetensors"))
    keys = sorted(sd)
    shards = {"model-00001-of-00002.safetensors": keys[:5], "model-00002-of-00002.safetensors": keys[5:]}
    for name, part in shards.items():
        save_file({k: sd[k] for k in part}, str(tmp_path / name))
    index = {"weight_map": {k: name for name, part in shards.items() for k in part}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    os.remove(tmp_path / "model.safetensors")
    back, _ = load_checkpoint(str(tmp_path))
    assert all(torch.equal(back.state_dict()[k], v) for k, v in model.state_dict().items())
    os.remove(tmp_path / "model-00002-of-00002.safetensors")  # a shard the index names is gone: one error naming it
    with pytest.raises(UserError, match="model-00002-of-00002.safetensors: missing weights file"):
        load_checkpoint(str(tmp_path))
    (tmp_path / "model.safetensors.index.json").write_text("{}")
    with pytest.raises(UserError, match="index.json: not a valid weights index"):
        load_checkpoint(str(tmp_path))


def test_rng_state_roundtrip_reproduces_draws_and_loads_weights_only(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    random.random(), np.random.rand(), torch.rand(1)  # move every generator off its seed
    save_train_state(str(tmp_path), {"rng": rng_state(), "step": 7})
    draw = lambda: (random.random(), np.random.rand(3).tolist(), np.random.randn(), torch.rand(4).tolist())
    first = draw()
    state = torch.load(tmp_path / "train_state.pt", weights_only=True)  # no pickled numpy/python objects
    assert state["step"] == 7
    set_rng_state(state["rng"])
    assert draw() == first
    set_rng_state(load_train_state(str(tmp_path))["rng"])
    assert draw() == first
    assert draw() != first  # and the generators really move on


def test_rng_state_keeps_numpy_gaussian_cache(tmp_path):
    np.random.seed(0)
    np.random.randn()  # numpy caches the second Box-Muller value: it is part of the state
    st = rng_state()
    a = np.random.randn(3).tolist()
    save_train_state(str(tmp_path), {"rng": st})
    set_rng_state(load_train_state(str(tmp_path))["rng"])
    assert np.random.randn(3).tolist() == a


def test_train_state_is_written_atomically(tmp_path):
    w = torch.randn(3, 4)
    save_train_state(str(tmp_path), {"step": 1, "w": w})
    save_train_state(str(tmp_path), {"step": 2, "w": w * 2, "nested": {"lr": [0.1, 0.2]}})
    assert os.listdir(tmp_path) == ["train_state.pt"]  # replaced in place, no .tmp left
    st = load_train_state(str(tmp_path))
    assert st["step"] == 2 and torch.equal(st["w"], w * 2) and st["nested"] == {"lr": [0.1, 0.2]}


def test_a_failed_write_keeps_the_previous_file(tmp_path):
    path = str(tmp_path / "metrics.json")
    write_json(path, {"loss": 1.0})
    with pytest.raises(TypeError):
        write_json(path, {"loss": object()})  # json.dump fails halfway through
    assert json.loads(open(path).read()) == {"loss": 1.0}
    assert os.listdir(tmp_path) == ["metrics.json"]  # and the half-written temporary is gone
