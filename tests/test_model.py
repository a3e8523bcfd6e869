import os

import pytest
import torch

from nanoalign import hub
from nanoalign.checkpoint import save_checkpoint
from nanoalign.model import ModelConfig, Transformer, last_token_index
from nanoalign.packing import segment_mask


def hf_from_dir(path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def test_config_roundtrips_through_hf_keys():
    cfg = ModelConfig(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    assert ModelConfig.from_hf(cfg.to_hf()) == cfg
    transformers = pytest.importorskip("transformers")
    hf = transformers.LlamaConfig(**cfg.to_hf())
    assert (hf.hidden_size, hf.num_key_value_heads, hf.rope_parameters["rope_theta"]) == (128, 2, cfg.rope_theta)


@pytest.mark.parametrize("tied", [True, False])
def test_tiny_logits_match_transformers(tmp_path, tied):
    cfg = ModelConfig(vocab_size=259, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, rope_theta=500.0, tie_word_embeddings=tied)
    model = Transformer(cfg).init_weights(seed=3).eval()
    tok = hub.load("tiny")[1]
    save_checkpoint(str(tmp_path), model, tok)
    hf = hf_from_dir(str(tmp_path))
    ids = torch.randint(0, 259, (2, 17), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding: HF derives no positions from the mask, so pass ours explicitly
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ours = model(ids, attention_mask=mask)
        theirs = hf(ids, attention_mask=mask, position_ids=pos).logits
    diff = (ours - theirs)[mask.bool()].abs().max().item()
    assert diff <= 1e-4, diff


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


def test_return_hidden_then_lm_head_equals_logits(tiny):
    model, _ = tiny
    ids = torch.randint(3, 259, (2, 6))
    with torch.no_grad():
        assert torch.allclose(model.lm_head(model(ids, return_hidden=True)), model(ids), atol=1e-6)


def test_last_token_index_reads_the_last_real_position():
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 0, 0, 0, 0]])
    assert last_token_index(mask).tolist() == [2, 4, 0]


def test_compiled_pointwise_kernels_match_eager_and_do_not_recompile_per_length():
    from torch._dynamo.utils import counters
    from nanoalign import model as M
    from nanoalign.lora import apply_lora
    model, _ = hub.load("tiny")
    apply_lora(model, 4, 8.0)

    def value_and_grads(T):
        ids = torch.randint(3, 259, (2, T), generator=torch.Generator().manual_seed(T))
        out = model(ids).square().mean()
        return [out.detach(), *torch.autograd.grad(out, [p for p in model.parameters() if p.requires_grad])]

    eager = {T: value_and_grads(T) for T in (9, 17, 30)}
    try:
        M.compile_pointwise()
        before = counters["stats"]["unique_graphs"]
        compiled = value_and_grads(9)
        frames = counters["stats"]["unique_graphs"]
        assert frames > before  # the kernels really were compiled
        compiled = {9: compiled, 17: value_and_grads(17), 30: value_and_grads(30)}
        assert counters["stats"]["unique_graphs"] == frames  # dynamic shapes: new lengths reuse the graphs
    finally:  # back to eager for the rest of the suite
        M._rms_norm, M._apply_rope, M._swiglu = M.rms_norm, M.apply_rope, M.swiglu
    for T in eager:
        for a, b in zip(compiled[T], eager[T]):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
