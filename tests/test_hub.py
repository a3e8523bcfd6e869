import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models

from conftest import assert_user_error, run_cli
from nanoalign import hub
from nanoalign.checkpoint import save_checkpoint
from nanoalign.cli import UserError
from nanoalign.model import PRESETS, ModelConfig, Transformer, rope_frequencies
from nanoalign.tokenizer import Tokenizer


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


# --- GGUF files of each architecture, written by the gguf package's own writer -----------------------------------
GGUF_FAMILIES = {  # GGUF architecture -> (test_families family, tokenizer.ggml.pre)
    "llama": ("llama3.2", "llama-bpe"), "qwen2": ("qwen2.5", "qwen2"), "qwen3": ("qwen3", "qwen2")}
HF_TO_GGUF = {v: k for k, v in hub.GGUF_NAMES.items()}


def write_gguf(path, model, tok_dir, arch, pre):
    """What llama.cpp's converter writes: hyperparameters, the tokenizer, and weights under GGUF names, with the
    Q/K rows of arch llama permuted and Llama 3.1's RoPE scaling as a rope_freqs tensor of divisors."""
    from gguf import GGUFWriter
    c, w = model.cfg, GGUFWriter(str(path), arch)
    w.add_context_length(c.max_position_embeddings), w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size), w.add_block_count(c.num_hidden_layers)
    w.add_head_count(c.num_attention_heads), w.add_head_count_kv(c.num_key_value_heads)
    w.add_key_length(c.head_dim), w.add_value_length(c.head_dim)
    w.add_layer_norm_rms_eps(c.rms_norm_eps), w.add_rope_freq_base(c.rope_theta)
    tj = json.load(open(os.path.join(tok_dir, "tokenizer.json")))
    specials = {t["content"] for t in tj["added_tokens"]}
    tokens = sorted(tj["model"]["vocab"], key=tj["model"]["vocab"].get)
    w.add_tokenizer_model("gpt2"), w.add_tokenizer_pre(pre), w.add_token_list(tokens)
    w.add_token_types([(4 if t.startswith("<think") or t.startswith("</think") else 3) if t in specials else 1
                       for t in tokens])  # 3: control, 4: user-defined (Qwen3's <think>), 1: normal
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in tj["model"]["merges"]])
    tok = Tokenizer.from_dir(tok_dir)
    w.add_bos_token_id(tokens.index(tok.bos) if tok.bos else 0), w.add_eos_token_id(tok.eos_id)
    w.add_chat_template(json.load(open(os.path.join(tok_dir, "tokenizer_config.json")))["chat_template"])
    if c.rope_scaling:
        w.add_tensor("rope_freqs.weight", (rope_frequencies(replace(c, rope_scaling=None)) /
                                           rope_frequencies(c)).numpy())
    for k, v in model.state_dict().items():
        if k == "lm_head.weight" and c.tie_word_embeddings:
            continue
        parts, v = k.split("."), v.detach().clone()
        if k.startswith("model.layers."):  # model.layers.N.self_attn.q_proj.weight -> blk.N.attn_q.weight
            name = f"blk.{parts[2]}.{HF_TO_GGUF['.'.join(parts[3:-1])]}.{parts[-1]}"
        else:
            name = f"{HF_TO_GGUF['.'.join(parts[:-1])]}.{parts[-1]}"
        if arch == "llama" and parts[-2] in ("q_proj", "k_proj"):  # llama.cpp's converter: interleave rotary halves
            n = c.num_attention_heads if parts[-2] == "q_proj" else c.num_key_value_heads
            v = v.reshape(n, 2, v.shape[0] // n // 2, *v.shape[1:]).swapaxes(1, 2).reshape(v.shape)
        w.add_tensor(name, v.numpy())
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("arch", GGUF_FAMILIES)
def test_gguf_of_each_architecture_loads_with_the_original_logits_and_tokenizer(tmp_path, arch):
    """A model written to GGUF reads back equal, and transformers' own GGUF reader agrees on logits and tokens."""
    from test_families import hf_family_dir
    family, pre = GGUF_FAMILIES[arch]
    model, tok = hub.load(hf_family_dir(tmp_path / "hf", family))
    write_gguf(tmp_path / "m.gguf", model, str(tmp_path / "hf"), arch, pre)
    back, back_tok = hub.load(str(tmp_path / "m.gguf"))
    assert back.cfg.model_type == arch and back.cfg.rope_scaling == model.cfg.rope_scaling
    text = "It is the 2024 tree, Ünïcode 世界 and 12345 rivers!\n\n  ok"
    ids = torch.tensor([tok.encode(text)])
    assert back_tok.encode(text) == tok.encode(text) and back_tok.family == tok.family
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "It is."}]
    assert back_tok.render_chat(msgs) == tok.render_chat(msgs)
    with torch.no_grad():
        assert torch.equal(back.eval()(ids), model.eval()(ids))
    transformers = pytest.importorskip("transformers")
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="m.gguf")
    assert hf_tok.encode(text, add_special_tokens=False) == tok.encode(text)
    if arch == "qwen3":  # transformers' GGUF reader leaves head_dim at Qwen3Config's 128 (it ignores key_length)
        return
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="m.gguf", dtype=torch.float32)
    with torch.no_grad():
        assert (hf.eval()(ids).logits - model(ids)).abs().max() <= 1e-4


def test_gguf_of_an_unsupported_architecture_or_rope_scaling_is_refused(tmp_path):
    from gguf import GGUFWriter
    for i, (arch, extra) in enumerate([("gemma2", {}), ("llama", {"llama.rope.scaling.type": "yarn"})]):
        w = GGUFWriter(str(tmp_path / f"{i}.gguf"), arch)
        w.add_token_list(["a"]), w.add_token_types([1])
        for k, v in extra.items():
            w.add_string(k, v)
        w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file()
        w.close()
        with pytest.raises(UserError, match=r"is not supported \(supported: llama, qwen2, qwen3"):
            hub.load(str(tmp_path / f"{i}.gguf"))
