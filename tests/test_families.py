"""Bring your own model: a random tiny Llama 3.2, Qwen2.5, Qwen3 and Mistral, each saved by transformers with its
family's real chat template, loads with transformers' logits, trains under all four scripts, saves as that family
(causal LM and reward model), and its LoRA adapter loads in PEFT equal to the merged checkpoint."""
import copy
import importlib.util
import json
import os
import sys
from dataclasses import replace

import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers

from conftest import ROOT

from nanoalign import hub
from nanoalign.checkpoint import save_checkpoint
from nanoalign.cli import UserError
from nanoalign.lora import apply_lora, merge_lora, save_adapter
from nanoalign.model import FAMILIES as HF_CLASS
from nanoalign.tokenizer import PRE, bytes_to_unicode

try:  # the oracle; test_tokenizer.py imports write_tokenizer from here without it
    import transformers
except ImportError:
    transformers = None
pytestmark = pytest.mark.skipif(transformers is None, reason="needs transformers")
TEMPLATES = os.path.join(ROOT, "tests", "assets", "chat_templates")
CHATML = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
SPECIALS = {  # chat template asset -> the special tokens its tokenizer has
    "smollm2": CHATML, "qwen2": CHATML, "qwen2.5": CHATML, "qwen3": CHATML + ["<think>", "</think>"],
    "qwen3-0.6b": CHATML + ["<think>", "</think>"],
    "llama3": ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
    "mistral-v0.3": ["<unk>", "<s>", "</s>", "[INST]", "[/INST]"],
}
SPECIALS["llama3.2"] = SPECIALS["llama3"]
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}  # Llama 3.2's; with rope_theta 5e5 and head_dim 16 some
# frequencies are kept, some interpolated, the rest divided by `factor`
FAMILIES = {  # name -> (config.json of a tiny random model, chat template)
    "llama3.2": (dict(model_type="llama", rope_parameters={**LLAMA3_ROPE, "rope_theta": 500000.0},
                      tie_word_embeddings=True), "llama3.2"),
    "qwen2.5": (dict(model_type="qwen2", rope_parameters={"rope_type": "default", "rope_theta": 1e6},
                     tie_word_embeddings=True), "qwen2.5"),
    "qwen3": (dict(model_type="qwen3", head_dim=24, tie_word_embeddings=True), "qwen3"),
    "mistral": (dict(model_type="mistral", sliding_window=24, tie_word_embeddings=False), "mistral-v0.3"),
}
TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=512)


TRL_COPIES = {"qwen2.5": "qwen2_5", "qwen3": "qwen3", "llama3": "llama3", "llama3.2": "llama3_2"}


@pytest.mark.parametrize("asset", TRL_COPIES)
def test_template_assets_are_the_families_real_text(asset):
    """TRL keeps verbatim copies of these families' templates, checked against the Hub, to recognise a model by
    exact match; our assets (the oracle's input for every family test) must be the same text."""
    spec = importlib.util.find_spec("trl")  # located, not imported: importing trl pulls in half of the HF stack
    path = spec and os.path.join(spec.submodule_search_locations[0], "chat_templates", TRL_COPIES[asset] + ".jinja")
    if not path or not os.path.exists(path):
        pytest.skip("needs trl's chat_templates/")
    with open(os.path.join(TEMPLATES, asset + ".json")) as f, open(path) as g:
        assert json.load(f)["chat_template"] == g.read()


def write_tokenizer(path, template: str) -> int:
    """A tiny tokenizer of the family's kind with its specials and a few merges, and a tokenizer_config.json holding
    the real chat template from tests/assets; returns the vocabulary size. Byte-level BPE with the family's regex
    split (Llama 3, Qwen, SmolLM2), or SentencePiece-style ▁ for spaces with byte fallback (Mistral)."""
    with open(os.path.join(TEMPLATES, template + ".json")) as f:
        config = {k: v for k, v in json.load(f).items() if not k.startswith("_")}
    specials = SPECIALS[template]
    vocab = {s: i for i, s in enumerate(specials)}
    if template.startswith("mistral"):
        vocab |= {f"<0x{b:02X}>": len(vocab) + b for b in range(256)}
        vocab |= {ch: len(vocab) + i for i, ch in enumerate("▁" + "".join(map(chr, range(33, 127))))}
        merges = [("▁", "t"), ("h", "e"), ("▁t", "he"), ("I", "t"), ("▁", "a"), ("i", "s")]
    else:
        vocab |= {ch: len(vocab) + b for b, ch in bytes_to_unicode().items()}
        merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("Ċ", "Ċ"), ("I", "t"), ("Ġ", "a"), ("i", "s")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=template.startswith("mistral")))
    if template.startswith("mistral"):
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    else:
        split = PRE["llama-bpe" if template.startswith("llama") else "qwen2" if template.startswith("qwen") else
                    "smollm"]
        tok.pre_tokenizer = pre_tokenizers.Sequence(split + [pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                                      use_regex=template == "smollm2")])
        tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    os.makedirs(path, exist_ok=True)
    tok.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", **config}, f)
    return len(vocab)


def hf_family_dir(path, name: str, seed: int = 0) -> str:
    """A random tiny model of the family, saved by transformers itself, with its tokenizer files."""
    overrides, template = FAMILIES[name]
    vocab_size = write_tokenizer(path, template)
    cfg = transformers.AutoConfig.for_model(**{**TINY, **overrides, "vocab_size": vocab_size})
    torch.manual_seed(seed)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {name: hf_family_dir(root / name, name) for name in FAMILIES}


def ids_for(tok, n=3, T=20, seed=0):
    """Token ids of real text (no pad/end-of-turn tokens, which transformers' classifier treats as padding)."""
    text = "It is the tree, the river and a stone. " * 3
    ids = tok.encode(text)
    return torch.tensor([ids[i:i + T] for i in range(n)])


@pytest.mark.parametrize("name", FAMILIES)
def test_hf_directory_loads_with_transformers_logits(family_dirs, name):
    model, tok = hub.load(family_dirs[name])
    assert model.cfg.model_type == FAMILIES[name][0]["model_type"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(family_dirs[name], dtype=torch.float32).eval()
    ids = ids_for(tok)
    with torch.no_grad():
        diff = (model.eval()(ids) - hf(ids).logits).abs().max().item()
    assert diff <= 1e-4, diff


@pytest.mark.parametrize("name", FAMILIES)
def test_checkpoint_saves_as_its_family_for_transformers(family_dirs, tmp_path, name):
    """Causal LM and reward model: config.json names the family's own classes, transformers loads them as such and
    computes our logits and scores."""
    model, tok = hub.load(family_dirs[name])
    family = HF_CLASS[model.cfg.model_type]
    save_checkpoint(str(tmp_path / "lm"), model, tok)
    rm = copy.deepcopy(model)
    rm.add_score_head(seed=1)
    save_checkpoint(str(tmp_path / "rm"), rm, tok)
    ids = ids_for(tok, seed=1)
    for kind, auto in (("lm", transformers.AutoModelForCausalLM),
                       ("rm", transformers.AutoModelForSequenceClassification)):
        cfg = json.loads((tmp_path / kind / "config.json").read_text())
        arch = f"{family}ForCausalLM" if kind == "lm" else f"{family}ForSequenceClassification"
        assert cfg["architectures"] == [arch] and cfg["model_type"] == model.cfg.model_type
        hf = auto.from_pretrained(str(tmp_path / kind), dtype=torch.float32).eval()
        assert type(hf).__name__ == arch
        with torch.no_grad():
            if kind == "lm":
                ours, theirs = model.eval()(ids), hf(ids).logits
            else:  # the reward at the last token; transformers pools at the last token that is not pad_token_id
                ours, theirs = rm.eval().score(rm(ids, return_hidden=True))[:, -1, 0], hf(ids).logits[:, 0]
        assert (ours - theirs).abs().max().item() <= 1e-4, kind
    back, tok2 = hub.load(str(tmp_path / "lm"))
    assert back.cfg == replace(model.cfg, eos_token_id=tok.eos_id)  # saved: the template's end of turn
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "It is."}]
    assert tok2.render_chat(msgs) == tok.render_chat(msgs)  # the template travels with the checkpoint


@pytest.mark.parametrize("name", FAMILIES)
def test_lora_adapter_loads_in_peft_equal_to_the_merged_checkpoint(family_dirs, tmp_path, name):
    peft = pytest.importorskip("peft")
    model, tok = hub.load(family_dirs[name])
    apply_lora(model, r=4, alpha=8.0)
    with torch.no_grad():  # B = 0 at init: make the adapter matter
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n))) * 0.05)
    save_adapter(model.eval(), str(tmp_path / "adapter"))
    ids = ids_for(tok)
    with torch.no_grad():
        ours = model(ids)
        save_checkpoint(str(tmp_path / "merged"), merge_lora(model), tok)
        base = transformers.AutoModelForCausalLM.from_pretrained(family_dirs[name], dtype=torch.float32)
        theirs = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()(input_ids=ids).logits
        merged = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32)
        merged = merged.eval()(ids).logits
        plain = transformers.AutoModelForCausalLM.from_pretrained(family_dirs[name], dtype=torch.float32).eval()(ids)
    assert (ours - plain.logits).abs().max() > 1e-3  # the adapter matters
    assert (ours - theirs).abs().max() <= 1e-4 and (merged - theirs).abs().max() <= 1e-4


def test_a_weight_the_family_lacks_is_an_error_not_a_silent_drop(family_dirs, tmp_path):
    """Qwen2's q/k/v biases read as a Llama: the loader names the first bias, it never drops them."""
    d = tmp_path / "qwen_as_llama"
    d.mkdir()
    for f in os.listdir(family_dirs["qwen2.5"]):
        (d / f).write_bytes(open(os.path.join(family_dirs["qwen2.5"], f), "rb").read())
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(UserError, match=r"model.safetensors: unexpected weight model.layers.0.self_attn.k_proj.bias "
                                        r"\(6 in all\) for a llama model"):
        hub.load(str(d))


# --- the four scripts on each family ---------------------------------------------------------------------------
PAIRS = [("Name a tree.", "It is the oak.", "no"), ("Name a river.", "It is the Nile.", "river"),
         ("Say hi.", "hi there", "..."), ("Is it late?", "It is late.", "what")]


def write_data(root):
    """SFT conversations (one with a system prompt, one with two turns), preference pairs and PPO prompts."""
    sft = [[{"role": "user", "content": p}, {"role": "assistant", "content": c}] for p, c, _ in PAIRS]
    sft[0] = [{"role": "system", "content": "Be brief."}] + sft[0]
    sft[1] += [{"role": "user", "content": "And another?"}, {"role": "assistant", "content": "the Thames"}]
    files = {"sft": [{"messages": m} for m in sft],
             "prefs": [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in PAIRS],
             "prompts": [{"prompt": p} for p, _, _ in PAIRS]}
    for name, rows in files.items():
        with open(os.path.join(root, name + ".jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    return {name: os.path.join(root, name + ".jsonl") for name in files}


@pytest.mark.parametrize("name", FAMILIES)
def test_sft_rm_dpo_ppo_run_on_the_family_and_save_as_it(family_dirs, tmp_path, name, one_thread):
    sys.path.insert(0, ROOT)
    import train_dpo, train_ppo, train_rm, train_sft  # the scripts, called in-process
    data, family = write_data(str(tmp_path)), HF_CLASS[FAMILIES[name][0]["model_type"]]
    common = dict(max_steps=2, batch_size=2, lr=1e-3, warmup=0, max_len=256, log_every=1, device="cpu")
    sft_dir, rm_dir = str(tmp_path / "sft"), str(tmp_path / "rm")
    sft = train_sft.main(train_sft.Config(init=family_dirs[name], data=data["sft"], out=sft_dir, **common))
    rm = train_rm.main(train_rm.Config(init=sft_dir, data=data["prefs"], out=rm_dir, lora_rank=4, **common))
    dpo = train_dpo.main(train_dpo.Config(init=sft_dir, data=data["prefs"], out=str(tmp_path / "dpo"), lora_rank=4,
                                          **common))
    ppo = train_ppo.main(train_ppo.Config(init=sft_dir, prompts=data["prompts"], reward=rm_dir, max_steps=2,
                                          out=str(tmp_path / "ppo"), rollout_batch=4, minibatch_size=4,
                                          max_new_tokens=8, max_len=256, lr=1e-3, device="cpu", log_every=1))
    for metrics in (sft, rm, dpo, ppo):
        assert all(v == v for v in metrics.values() if isinstance(v, float)), metrics  # no NaN
    assert sft["loss"] < sft["first_loss"]  # two steps at lr 1e-3 on four rows: the loss moved down
    for run, kind in (("sft", "ForCausalLM"), ("rm", "ForSequenceClassification"), ("dpo", "ForCausalLM"),
                      ("ppo", "ForCausalLM")):
        cfg = json.loads((tmp_path / run / "config.json").read_text())
        assert cfg["architectures"] == [family + kind], run
