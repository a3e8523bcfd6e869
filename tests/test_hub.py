import json
import os
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models

from conftest import assert_user_error, run_cli
from nanoalign import hub
from nanoalign.checkpoint import save_checkpoint
from nanoalign.cli import UserError
from nanoalign.model import PRESETS, ModelConfig, Transformer


def tiny_checkpoint(path, **overrides):
    model = Transformer(ModelConfig(**{**PRESETS["tiny"], **overrides})).init_weights(seed=0)
    save_checkpoint(str(path), model, hub.load("tiny")[1])
    return str(path)


@pytest.fixture(scope="module")
def bad_models(tmp_path_factory):
    """name -> (--model argument, the file the error must name)."""
    root = tmp_path_factory.mktemp("bad")
    cases = {"unknown-alias": ("smollm3-360m-instruct", "smollm3-360m-instruct"),
             "missing-dir": (str(root / "no_such_dir"), str(root / "no_such_dir")),
             "missing-gguf": (str(root / "nothing.gguf"), str(root / "nothing.gguf"))}

    d = tiny_checkpoint(root / "truncated_st")
    st = os.path.join(d, "model.safetensors")
    data = open(st, "rb").read()
    open(st, "wb").write(data[:len(data) // 2])
    cases["truncated-safetensors"] = (d, st)

    d = tiny_checkpoint(root / "garbage_st")
    open(os.path.join(d, "model.safetensors"), "wb").write(b"\xff" * 64)
    cases["garbage-safetensors"] = (d, os.path.join(d, "model.safetensors"))

    gguf = str(root / "truncated.gguf")
    with open(hub.find_smollm2_gguf(), "rb") as src, open(gguf, "wb") as dst:
        dst.write(src.read(8192))  # header and the start of the metadata, then nothing
    cases["truncated-gguf"] = (gguf, gguf)

    d = tiny_checkpoint(root / "wrong_shapes")
    cfg_path = os.path.join(d, "config.json")
    cfg = json.load(open(cfg_path))
    cfg["intermediate_size"] = 96  # the weights have 128
    json.dump(cfg, open(cfg_path, "w"))
    cases["config-disagrees"] = (d, cfg_path)

    d = tiny_checkpoint(root / "big_vocab", vocab_size=200)  # 259 byte tokens but only 200 embeddings
    cases["tokenizer-too-big"] = (d, os.path.join(d, "tokenizer.json"))

    d = tiny_checkpoint(root / "bad_json")
    open(os.path.join(d, "config.json"), "w").write('{"hidden_size": 64,')
    cases["config-not-json"] = (d, os.path.join(d, "config.json"))

    d = root / "empty_dir"
    d.mkdir()
    cases["no-config"] = (str(d), str(d / "config.json"))

    d = tiny_checkpoint(root / "no_tokenizer")
    os.remove(os.path.join(d, "tokenizer.json"))
    cases["no-tokenizer"] = (d, os.path.join(d, "tokenizer.json"))

    d = tiny_checkpoint(root / "foreign_arch")
    cfg = json.load(open(os.path.join(d, "config.json")))
    json.dump({**cfg, "model_type": "gpt2"}, open(os.path.join(d, "config.json"), "w"))
    cases["foreign-model-type"] = (d, os.path.join(d, "config.json"))

    d = tiny_checkpoint(root / "no_chatml")  # e.g. a Llama-2 style vocabulary without <|im_start|>/<|im_end|>
    wl = HFTokenizer(models.WordLevel(vocab={"<unk>": 0, "<s>": 1, "</s>": 2, "a": 3}, unk_token="<unk>"))
    wl.save(os.path.join(d, "tokenizer.json"))
    cases["tokenizer-not-chatml"] = (d, os.path.join(d, "tokenizer.json"))

    plain = root / "weights.bin"
    plain.write_bytes(b"\0" * 16)
    cases["plain-file"] = (str(plain), str(plain))
    return cases


CASES = ["unknown-alias", "missing-dir", "missing-gguf", "truncated-safetensors", "garbage-safetensors",
         "truncated-gguf", "config-disagrees", "tokenizer-too-big", "config-not-json", "no-config", "no-tokenizer",
         "foreign-model-type", "tokenizer-not-chatml", "plain-file"]


# one case per loader layer (alias resolution, GGUF reader, weights file, config vs weights, tokenizer vs model,
# tokenizer file); every subprocess costs seconds of torch import, the in-process test covers all CASES
CLI_CASES = ["unknown-alias", "truncated-gguf", "truncated-safetensors", "config-disagrees", "tokenizer-too-big",
             "no-tokenizer"]


@pytest.mark.parametrize("case", CASES)
def test_bad_model_raises_user_error_naming_the_file(bad_models, case):
    arg, named = bad_models[case]
    with pytest.raises(UserError) as e:
        hub.load(arg)
    msg = str(e.value)
    assert named in msg, msg
    assert "\n" not in msg


def test_specific_messages_say_what_is_wrong(bad_models):
    def msg(case):
        with pytest.raises(UserError) as e:
            hub.load(bad_models[case][0])
        return str(e.value)
    assert "shapes disagree" in msg("config-disagrees") and "(128, 64)" in msg("config-disagrees")
    assert "259" in msg("tokenizer-too-big") and "200" in msg("tokenizer-too-big")
    assert "truncated" in msg("truncated-safetensors")
    assert "GGUF" in msg("truncated-gguf")
    assert "unknown model" in msg("unknown-alias")
    assert "<|im_start|>" in msg("tokenizer-not-chatml")


def test_cli_exits_2_with_one_error_line_for_each_bad_model(bad_models, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "hi"}\n')
    out = tmp_path / "o.jsonl"
    jobs = []
    for i, case in enumerate(CLI_CASES):  # each layer that can fail, through one of the two CLIs
        arg, named = bad_models[case]
        if i % 2 == 0:
            args = ["-m", "nanoalign.generate", "--model", arg, "--prompts", str(prompts), "--out", str(out)]
        else:
            args = ["-m", "nanoalign.chat", "--model", arg, "--once", "hi", "--max-new-tokens", "2"]
        jobs.append((case, named, args))
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda j: run_cli(j[2]), jobs))
    for (case, named, args), r in zip(jobs, results):
        assert_user_error(r, named)
        assert r.stdout == "", (case, r.stdout)  # nothing half-done on stdout either
    assert not out.exists()


def test_good_inputs_still_load(tmp_path):
    """The same loader accepts what the bad cases are near misses of."""
    d = tiny_checkpoint(tmp_path / "ok", tie_word_embeddings=False)
    model, tok = hub.load(d)
    ref, _ = hub.load("tiny")
    assert model.cfg == ModelConfig(**{**PRESETS["tiny"], "tie_word_embeddings": False})
    assert tok.vocab_size == 259
    assert hub.load("tiny", dtype=torch.bfloat16)[0].model.embed_tokens.weight.dtype == torch.bfloat16
    assert torch.equal(ref.model.embed_tokens.weight, hub.load("tiny")[0].model.embed_tokens.weight)  # seed 0
