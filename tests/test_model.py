import math
import os

import pytest
import torch

from nanoalign import hub
from nanoalign.model import FAMILIES, ModelConfig, Transformer, last_token_index, rope_frequencies
from nanoalign.packing import segment_mask


def hf_from_dir(path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


TINY = dict(vocab_size=259, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, rope_theta=500.0)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}  # a short context, so most frequencies are rescaled
FAMILY_CONFIGS = {  # one switch each, on a random tiny config
    "llama-tied": dict(model_type="llama"),
    "llama-untied": dict(model_type="llama", tie_word_embeddings=False),
    "llama3-rope": dict(model_type="llama", rope_scaling=LLAMA3_ROPE),
    "qwen2-bias": dict(model_type="qwen2"),
    "qwen3-qk-norm": dict(model_type="qwen3", head_dim=24, tie_word_embeddings=False),  # 4 * 24 != 64
    "mistral-window": dict(model_type="mistral", sliding_window=5, tie_word_embeddings=False),
}


def hf_twin(model):
    """transformers' own *ForCausalLM of the same family, config and weights."""
    transformers = pytest.importorskip("transformers")
    d = model.cfg.to_hf()
    hf = getattr(transformers, d["architectures"][0])(transformers.AutoConfig.for_model(**d))
    hf.load_state_dict(model.state_dict())  # strict: every parameter name matches
    return hf.eval()


def left_padded_batch(T=17, pad=5):
    ids = torch.randint(0, 259, (2, T), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :pad] = 0
    return ids, mask


@pytest.mark.parametrize("family", FAMILY_CONFIGS)
def test_config_roundtrips_through_hf_keys(family):
    cfg = ModelConfig(**TINY, **FAMILY_CONFIGS[family])
    assert ModelConfig.from_hf(cfg.to_hf()) == cfg
    d = cfg.to_hf(reward=True)
    assert d["architectures"] == [FAMILIES[cfg.model_type] + "ForSequenceClassification"] and d["num_labels"] == 1


@pytest.mark.parametrize("family", FAMILY_CONFIGS)
def test_family_logits_match_transformers(family):
    model = Transformer(ModelConfig(**TINY, **FAMILY_CONFIGS[family])).init_weights(seed=3).eval()
    hf = hf_twin(model)
    ids, mask = left_padded_batch()
    pos = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding: HF derives no positions from the mask, pass ours
    with torch.no_grad():
        ours = model(ids, attention_mask=mask)
        theirs = hf(ids, attention_mask=mask, position_ids=pos).logits
    diff = (ours - theirs)[mask.bool()].abs().max().item()
    assert diff <= 1e-4, diff


@pytest.mark.parametrize("switch", [dict(rope_scaling=LLAMA3_ROPE), dict(sliding_window=5)])
def test_rope_scaling_and_sliding_window_change_the_logits(switch):
    """The parity above is only worth something if the switch is live at these sizes."""
    on = Transformer(ModelConfig(**TINY, **switch)).init_weights(seed=3).eval()
    off = Transformer(ModelConfig(**TINY)).init_weights(seed=3).eval()
    ids, _ = left_padded_batch()
    with torch.no_grad():
        a, b = on(ids), off(ids)
    assert torch.allclose(a[:, :5], b[:, :5], atol=1e-5) != ("rope_scaling" in switch)  # a window of 5: same start
    assert (a - b).abs().max() > 1e-3


def test_llama3_rope_frequencies_by_hand():
    """Context 32, low/high_freq_factor 1/4: wavelengths under 32/4 = 8 are kept, those over 32/1 divided by
    `factor`, the ones between interpolated. With D = 16 and theta 500 the wavelengths are 6.3, 13.7, 29.7, 64, ..."""
    scaled = {**LLAMA3_ROPE, "original_max_position_embeddings": 32}
    base = rope_frequencies(ModelConfig(hidden_size=64, num_attention_heads=4, rope_theta=500.0))  # (8,)
    got = rope_frequencies(ModelConfig(hidden_size=64, num_attention_heads=4, rope_theta=500.0, rope_scaling=scaled))
    assert torch.allclose(base, 500.0 ** (-torch.arange(0, 16, 2) / 16))
    assert got[0] == base[0] and torch.equal(got[3:], base[3:] / 8)
    smooth = (32 / (2 * math.pi / base[1:3]) - 1) / (4 - 1)  # 0 at wavelength 32, 1 at 8
    assert torch.allclose(got[1:3], (1 - smooth) * base[1:3] / 8 + smooth * base[1:3])
    assert (base[1:3] / 8 < got[1:3]).all() and (got[1:3] < base[1:3]).all()


@pytest.mark.parametrize("family", FAMILY_CONFIGS)
def test_kv_cache_generation_equals_the_uncached_forward(family):
    """Prefill + one token at a time, with a left-padded row, past Mistral's window."""
    model = Transformer(ModelConfig(**TINY, **FAMILY_CONFIGS[family])).init_weights(seed=4).eval()
    ids, mask = left_padded_batch(T=12, pad=3)
    with torch.no_grad():
        full = model(ids, attention_mask=mask)
        model.setup_cache(2, 16)
        cache_mask = torch.cat([mask, torch.ones(2, 4, dtype=torch.long)], dim=1)  # (B, S) over the whole buffer
        first = model(ids[:, :7], attention_mask=cache_mask, cache_pos=torch.arange(7))
        steps = [model(ids[:, t:t + 1], attention_mask=cache_mask, cache_pos=torch.tensor([t])) for t in range(7, 12)]
        model.clear_cache()
    cached = torch.cat([first, *steps], dim=1)
    assert (cached - full)[mask.bool()].abs().max() <= 1e-5


def test_unsupported_model_type_and_rope_type_name_what_is_supported():
    with pytest.raises(ValueError, match=r"model_type 'gemma' is not supported \(supported: llama, mistral, qwen2, "
                                         r"qwen3\)"):
        ModelConfig.from_hf({**ModelConfig().to_hf(), "model_type": "gemma"})
    for rope in ({"rope_type": "yarn", "factor": 4.0}, {"type": "linear", "factor": 2.0}):
        with pytest.raises(ValueError, match=r"rope type '(yarn|linear)' is not supported \(supported: default, "
                                             r"llama3\)"):
            ModelConfig.from_hf({**ModelConfig().to_hf(), "rope_parameters": None, "rope_scaling": rope})
    with pytest.raises(ValueError, match="use_sliding_window"):
        ModelConfig.from_hf({**ModelConfig(model_type="qwen2").to_hf(), "use_sliding_window": True})


@pytest.mark.slow
def test_smollm2_logits_match_transformers(smollm2):
    model, tok = smollm2
    hf = hf_from_dir(os.path.join(hub.cache_dir(), hub.ALIAS))
    ids = torch.tensor([tok.render_prompt("Write a haiku about the sea.")])
    with torch.no_grad():
        diff = (model(ids) - hf(ids).logits).abs().max().item()
    assert diff <= 1e-4, diff


@pytest.mark.slow
def test_gguf_conversion_matches_transformers_own_gguf_reader(smollm2):
    """transformers dequantizes the same GGUF independently: an oracle for our unpermute and dequantize."""
    transformers = pytest.importorskip("transformers")
    gguf_path = hub.find_smollm2_gguf()
    hf = transformers.AutoModelForCausalLM.from_pretrained(os.path.dirname(gguf_path), gguf_file=os.path.basename(
        gguf_path), dtype=torch.float32).eval()
    model, tok = smollm2
    ids = torch.tensor([tok.render_prompt("Name a planet.")])
    with torch.no_grad():
        diff = (model(ids) - hf(ids).logits).abs().max().item()
    assert diff <= 1e-4, diff


def test_causality_future_tokens_do_not_change_past_logits(tiny):
    model, _ = tiny
    ids = torch.randint(3, 259, (1, 12), generator=torch.Generator().manual_seed(1))
    ids2 = ids.clone()
    ids2[0, 8:] = torch.randint(3, 259, (4,), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a, b = model(ids), model(ids2)
    assert torch.allclose(a[:, :8], b[:, :8], atol=1e-6)
    assert not torch.allclose(a[:, 8:], b[:, 8:], atol=1e-3)


def test_left_padding_gives_the_unpadded_logits(tiny):
    model, _ = tiny
    ids = torch.randint(3, 259, (1, 9), generator=torch.Generator().manual_seed(4))
    padded = torch.cat([torch.full((1, 4), 2), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 9, dtype=torch.long)], dim=1)
    with torch.no_grad():
        a = model(ids)
        b = model(padded, attention_mask=mask)[:, 4:]
    assert torch.allclose(a, b, atol=1e-5)


def test_kv_cache_prefill_plus_decode_equals_full_forward(tiny):
    model, _ = tiny
    ids = torch.randint(3, 259, (2, 10), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        full = model(ids)
        model.setup_cache(2, 16)
        mask = torch.ones(2, 16, dtype=torch.long)
        first = model(ids[:, :6], attention_mask=mask, cache_pos=torch.arange(6))
        steps = [model(ids[:, t:t + 1], attention_mask=mask, cache_pos=torch.tensor([t])) for t in range(6, 10)]
        model.clear_cache()
    assert torch.allclose(full[:, :6], first, atol=1e-5)
    assert torch.allclose(full[:, 6:], torch.cat(steps, dim=1), atol=1e-5)


def test_packed_documents_do_not_attend_across_boundaries(tiny):
    model, _ = tiny
    a = torch.randint(3, 259, (1, 5), generator=torch.Generator().manual_seed(6))
    b = torch.randint(3, 259, (1, 7), generator=torch.Generator().manual_seed(7))
    packed = torch.cat([a, b], dim=1)
    mask = segment_mask(torch.ones(1, 12, dtype=torch.long), torch.tensor([[1] * 5 + [2] * 7]))
    pos = torch.tensor([list(range(5)) + list(range(7))])
    with torch.no_grad():
        out = model(packed, mask, position_ids=pos)
        assert torch.allclose(out[:, :5], model(a), atol=1e-5)
        assert torch.allclose(out[:, 5:], model(b), atol=1e-5)


def test_sliding_window_counts_positions_in_prompt_shared_rows():
    """[prompt | a | b] in one row (nanoalign.packing), b's positions continuing the prompt's: with Mistral's window
    of 5, b's logits still equal those of [prompt | b] alone (a window by index would reach too far back)."""
    model = Transformer(ModelConfig(**TINY, model_type="mistral", sliding_window=5)).init_weights(seed=5).eval()
    p, a, b = (torch.randint(3, 259, (1, n), generator=torch.Generator().manual_seed(n)) for n in (6, 4, 7))
    seg = torch.tensor([[0] * 6 + [1] * 4 + [2] * 7])
    mask = segment_mask(torch.ones(1, 17, dtype=torch.long), seg)
    pos = torch.tensor([list(range(10)) + list(range(6, 13))])
    with torch.no_grad():
        out = model(torch.cat([p, a, b], dim=1), mask, position_ids=pos)
        assert torch.allclose(out[:, :10], model(torch.cat([p, a], dim=1)), atol=1e-5)
        assert torch.allclose(out[:, 10:], model(torch.cat([p, b], dim=1))[:, 6:], atol=1e-5)


def test_return_hidden_then_lm_head_equals_logits(tiny):
    model, _ = tiny
    ids = torch.randint(3, 259, (2, 6))
    with torch.no_grad():
        assert torch.allclose(model.lm_head(model(ids, return_hidden=True)), model(ids), atol=1e-6)


def test_last_token_index_reads_the_last_real_position():
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 0, 0, 0, 0]])
    assert last_token_index(mask).tolist() == [2, 4, 0]
