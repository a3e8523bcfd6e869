"""LoRA: fresh adapter is a no-op, only adapters train, merge == unmerged, disable == base, PEFT round trip, QLoRA."""
import copy
import json
import math

import pytest
import torch
import torch.nn as nn

from nanoalign.lora import LoRALinear, apply_lora, disable_adapter, load_adapter, lora_layers, merge_lora, save_adapter
from nanoalign.model import PRESETS, ModelConfig, Transformer
from nanoalign.nf4 import NF4Linear, quantize_nf4_


def _model():
    return Transformer(ModelConfig(**PRESETS["tiny"])).init_weights(0)


def _ids():
    return torch.randint(0, 259, (2, 10), generator=torch.Generator().manual_seed(0))


def _randomize_adapters(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * 0.1)


def test_fresh_adapter_leaves_output_unchanged():
    base = _model()
    ref = base(_ids())
    lora = apply_lora(copy.deepcopy(base), r=4, alpha=8)
    assert torch.equal(lora(_ids()), ref)  # B = 0 exactly


def test_dropout_drops_the_adapter_input_only():
    layer = LoRALinear(nn.Linear(64, 32), r=4, alpha=8, dropout=1.0)  # p = 1: every adapter input is dropped
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    x = torch.randn(3, 64)
    base = layer.base(x)
    assert torch.equal(layer.train()(x), base)  # training: the base path alone, untouched by dropout
    want = base + 2.0 * x @ layer.lora_A.weight.T @ layer.lora_B.weight.T  # eval: W x + (alpha/r) B A x
    torch.testing.assert_close(layer.eval()(x), want)


def test_scaling_and_parameter_count():
    m = apply_lora(_model(), r=4, alpha=8)
    q = m.model.layers[0].self_attn.q_proj
    assert isinstance(q, LoRALinear) and q.scaling == 2.0
    # per layer r*(in+out): q,o 4*(64+64), k,v 4*(64+32), gate,up,down 4*(64+128) -> 4096 per layer, 2 layers
    assert sum(p.numel() for p in m.parameters() if p.requires_grad) == 2 * 4 * (2 * 128 + 2 * 96 + 3 * 192) == 8192
    bound = 1 / math.sqrt(64)  # Kaiming-uniform(a=sqrt(5)) on fan_in 64 -> U(-1/8, 1/8)
    assert q.lora_A.weight.abs().max() <= bound and q.lora_A.weight.std() > bound / 3


def test_only_adapter_params_get_grads():
    m = apply_lora(_model(), r=4, alpha=8, dropout=0.1)
    m(_ids()).sum().backward()  # first step: grad_B nonzero, grad_A zero (B = 0)
    for name, p in m.named_parameters():
        if "lora_" in name:
            assert p.requires_grad and p.grad is not None
        else:
            assert not p.requires_grad and p.grad is None, name
    assert all(layer.lora_B.weight.grad.abs().sum() > 0 for layer in lora_layers(m).values())


def test_trainable_extra_modules_and_tied_lm_head():
    m = _model()
    m.add_score_head()
    apply_lora(m, r=2, alpha=4, trainable=("score",))
    assert m.score.weight.requires_grad and not m.model.norm.weight.requires_grad
    with pytest.raises(ValueError, match="tied"):
        apply_lora(_model(), r=2, alpha=4, targets=("lm_head",))
    with pytest.raises(ValueError, match="not found"):
        apply_lora(_model(), r=2, alpha=4, trainable=("nonexistent",))


def test_merged_equals_unmerged():
    m = apply_lora(_model(), r=4, alpha=8)
    _randomize_adapters(m)
    ref = m(_ids())
    assert (ref - _model()(_ids())).abs().max() > 1e-3  # the adapter matters
    layer = m.model.layers[1].mlp.down_proj
    want = layer.base.weight + 2.0 * layer.lora_B.weight @ layer.lora_A.weight  # W + (alpha/r) B A
    merged = merge_lora(m)
    assert not lora_layers(merged) and isinstance(merged.model.layers[0].self_attn.q_proj, nn.Linear)
    torch.testing.assert_close(merged.model.layers[1].mlp.down_proj.weight, want)
    assert not any(p.requires_grad for p in merged.parameters())
    assert set(merged.state_dict()) == set(_model().state_dict())  # plain HF key names again
    assert (merged(_ids()) - ref).abs().max() <= 1e-5


def test_disable_adapter_is_the_base_model_and_nests():
    base = _model()
    ref = base(_ids())
    m = apply_lora(copy.deepcopy(base), r=4, alpha=8)
    _randomize_adapters(m)
    on = m(_ids())
    assert (on - ref).abs().max() > 1e-3
    with disable_adapter(m):
        assert torch.equal(m(_ids()), ref)
        with disable_adapter(m):
            assert torch.equal(m(_ids()), ref)
        assert torch.equal(m(_ids()), ref)  # leaving the inner context keeps the outer one off
    assert torch.equal(m(_ids()), on)
    with pytest.raises(RuntimeError):
        with disable_adapter(m):
            raise RuntimeError("boom")
    assert torch.equal(m(_ids()), on)  # restored after an exception


def test_save_load_roundtrip(tmp_path):
    m = apply_lora(_model(), r=4, alpha=8, dropout=0.05)
    _randomize_adapters(m)
    m.eval()
    save_adapter(m, tmp_path, base_model_name_or_path="tiny")
    fresh = load_adapter(_model(), tmp_path).eval()  # applies LoRA from adapter_config.json
    assert torch.equal(fresh(_ids()), m(_ids()))
    with pytest.raises(ValueError, match="do not match"):
        load_adapter(apply_lora(_model(), r=4, alpha=8, targets=("q_proj",)), tmp_path)
    with pytest.raises(ValueError, match="do not match"):  # same keys, other shapes
        load_adapter(apply_lora(_model(), r=1, alpha=8), tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**cfg, "use_rslora": True}))  # alpha/sqrt(r): not ours
    with pytest.raises(ValueError, match="rsLoRA"):
        load_adapter(_model(), tmp_path)


def test_adapter_loads_in_peft_with_identical_outputs(tmp_path):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    base = _model()
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**base.cfg.to_hf()))
    hf.load_state_dict(base.state_dict(), strict=False)  # lm_head is tied
    hf.eval()
    with torch.no_grad():
        assert (hf(_ids()).logits - base(_ids())).abs().max() < 1e-5
    m = apply_lora(copy.deepcopy(base), r=4, alpha=16, targets=("q_proj", "v_proj", "down_proj")).eval()
    _randomize_adapters(m)
    save_adapter(m, tmp_path)
    pm = peft.PeftModel.from_pretrained(hf, tmp_path).eval()
    with torch.no_grad():
        ours, theirs = m(_ids()), pm(input_ids=_ids()).logits
    assert (ours - base(_ids())).abs().max() > 1e-3  # the adapter matters
    assert (ours - theirs).abs().max() < 1e-5
    # and back: peft's own save loads into our model
    pm.save_pretrained(tmp_path / "peft")
    back = load_adapter(_model(), tmp_path / "peft").eval()
    assert (back(_ids()) - ours).abs().max() < 1e-6


def test_qlora_equals_lora_on_dequantized_weights():
    q = _model()
    quantize_nf4_(q)
    apply_lora(q, r=4, alpha=8)
    _randomize_adapters(q)
    fp = _model()  # same architecture, weights replaced by the dequantized NF4 weights
    with torch.no_grad():
        for name, module in q.named_modules():
            if isinstance(module, NF4Linear):
                fp.get_submodule(name.removesuffix(".base")).weight.copy_(module.dequantize())
    apply_lora(fp, r=4, alpha=8)
    fp.load_state_dict({k: v for k, v in q.state_dict().items() if "lora_" in k}, strict=False)
    x = _ids()
    assert (q(x) - fp(x)).abs().max() < 1e-5
    q(x).sum().backward()
    assert all(p.grad is not None for p in q.parameters() if p.requires_grad)
    ref = q(x).detach()
    merged = merge_lora(q)  # NF4 base -> full-precision nn.Linear with W_dq + (alpha/r) B A
    assert not any(isinstance(mod, (NF4Linear, LoRALinear)) for mod in merged.modules())
    assert merged.model.layers[0].mlp.up_proj.weight.dtype == torch.float32
    assert (merged(x) - ref).abs().max() < 1e-5
