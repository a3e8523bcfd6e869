"""Each speed-up against the plain path: compiled kernels vs eager, the packed bf16 sampling copy vs the policy."""
import pytest
import torch
import torch.nn as nn
from torch._dynamo.utils import counters

from nanoalign.fast import (CompiledMLP, CompiledRMSNorm, FusedQKVAttention, PackedLinear, compile_pointwise,
                            compiled, sampling_copy)
from nanoalign.generate import generate
from nanoalign.lora import apply_lora, lora_layers
from nanoalign.model import PRESETS, ModelConfig, Transformer
from nanoalign.nf4 import NF4Linear, dequantize_blocks, quantize_nf4_

NEVER = -1  # an eos_id no token can equal: generation runs the full max_new_tokens


def tiny(seed=0, std=0.02, **kw):
    return Transformer(ModelConfig(**{**PRESETS["tiny"], **kw})).init_weights(seed=seed, std=std)


def prompts_of(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 259, (n,), generator=g).tolist() for n in lengths]


def randomize_adapters(model, scale, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():  # B = 0 at init: a non-zero adapter, so that merging matters
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * scale)


def value_and_grads(model, T):
    ids = torch.randint(3, 259, (2, T), generator=torch.Generator().manual_seed(T))
    out = model(ids).square().mean()
    return [out.detach(), *torch.autograd.grad(out, [p for p in model.parameters() if p.requires_grad])]


@pytest.mark.parametrize("family", ["llama", "qwen3"])  # qwen3 adds per-head q/k RMSNorms
def test_compile_pointwise_matches_eager_and_does_not_recompile_per_length(family):
    model = tiny(model_type=family)
    apply_lora(model, 4, 8.0)
    randomize_adapters(model, 0.1)
    keys = set(model.state_dict())
    eager = {T: value_and_grads(model, T) for T in (9, 17, 30)}
    assert compile_pointwise(model) is model
    assert type(model.model.norm) is CompiledRMSNorm and type(model.model.layers[1].mlp) is CompiledMLP
    assert set(model.state_dict()) == keys  # the same parameters under the same names
    before = counters["stats"]["unique_graphs"]
    compiled = {9: value_and_grads(model, 9)}
    graphs = counters["stats"]["unique_graphs"]
    assert graphs > before  # the kernels really were compiled
    compiled.update({T: value_and_grads(model, T) for T in (17, 30)})
    assert counters["stats"]["unique_graphs"] == graphs  # dynamic shapes: new lengths reuse the graphs
    for T in eager:
        for a, b in zip(compiled[T], eager[T]):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_compile_pointwise_compiles_nf4_dequantization_with_the_same_result():
    model = quantize_nf4_(tiny())
    apply_lora(model, 4, 8.0)
    randomize_adapters(model, 0.1)
    eager = value_and_grads(model, 11)
    compile_pointwise(model)
    assert all(m.dequantize_blocks is compiled(dequantize_blocks) for m in model.modules() if isinstance(m, NF4Linear))
    for a, b in zip(value_and_grads(model, 11), eager):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@torch.no_grad()
def test_sampling_copy_merges_lora_and_leaves_the_policy_alone():
    torch.manual_seed(0)  # LoRA's A init draws from the global generator
    model = tiny(std=0.3).eval()  # larger weights: greedy text varies instead of repeating one token
    apply_lora(model, r=4, alpha=8)
    randomize_adapters(model, 0.5)
    x = torch.tensor(prompts_of([12, 12]))
    want = model(x)
    fp32 = sampling_copy(model, torch.float32)
    assert not lora_layers(fp32) and lora_layers(model)  # the copy is merged; the policy keeps its adapters
    assert not any(p.requires_grad for p in fp32.parameters()) and not fp32.training
    torch.testing.assert_close(fp32(x), want, atol=1e-4, rtol=1e-4)
    ro32 = generate(fp32, x.tolist(), 6, NEVER, 0, temperature=0)
    assert not ro32.sequences.is_inference()  # decoded under inference_mode, handed back as ordinary tensors
    assert ro32.responses() == generate(model, x.tolist(), 6, NEVER, 0, temperature=0).responses()
    model = tiny()  # a normal init for the bf16 check
    apply_lora(model, r=4, alpha=8)
    randomize_adapters(model, 0.05)
    bf16 = sampling_copy(model)
    assert bf16.model.embed_tokens.weight.dtype == torch.bfloat16 and model.lm_head.weight.dtype == torch.float32
    # a bf16 rounding of the same distribution: next-token probabilities within a few percent
    p32, p16 = model(x).softmax(-1), bf16(x).float().softmax(-1)
    assert (p16 - p32).abs().sum(-1).max() < 0.05  # twice the total variation distance, per position


@torch.no_grad()
@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "mistral"])  # q/k/v biases, q/k norms, a window
def test_fused_and_packed_copy_gives_the_plain_models_outputs(family):
    model = tiny(std=0.3, model_type=family, sliding_window=6 if family == "mistral" else 0).eval()
    copied = sampling_copy(model, torch.float32)
    attn = copied.model.layers[0].self_attn
    assert type(attn) is FusedQKVAttention and isinstance(attn.qkv_proj, PackedLinear)
    assert not hasattr(attn, "q_proj") and (attn.qkv_proj.bias is not None) == (family == "qwen2")
    assert isinstance(copied.lm_head, PackedLinear) and not any(isinstance(m, nn.Linear) for m in copied.modules())
    x = torch.tensor(prompts_of([12, 12, 12]))
    torch.testing.assert_close(copied(x), model(x), atol=1e-4, rtol=1e-4)
    ids = prompts_of([12, 5, 9])  # left-padded prefill (M = 36 rows) and decode (M = 3), through the packed weights
    want = generate(model, ids, 8, NEVER, 0, temperature=0).responses()
    assert len({tuple(r) for r in want}) == 3 and generate(copied, ids, 8, NEVER, 0, temperature=0).responses() == want


@torch.no_grad()
def test_packed_bf16_linears_give_the_unpacked_outputs():
    model = Transformer(ModelConfig(**PRESETS["small"])).init_weights(seed=0)
    plain, packed = sampling_copy(model, pack=False), sampling_copy(model)
    assert plain.lm_head.weight.dtype == torch.bfloat16 and isinstance(packed.lm_head, PackedLinear)
    x = torch.tensor(prompts_of([12, 12, 12]))
    torch.testing.assert_close(packed(x).float(), plain(x).float(), atol=1e-4, rtol=1e-3)
    ids = prompts_of([12, 5, 9])
    assert generate(packed, ids, 8, NEVER, 0, temperature=0).responses() == \
        generate(plain, ids, 8, NEVER, 0, temperature=0).responses()


@torch.no_grad()
def test_sampling_copy_of_a_qlora_model_with_unadapted_nf4_layers():
    model = quantize_nf4_(tiny())
    apply_lora(model, r=4, alpha=8, targets=("q_proj", "v_proj"))  # k/o/MLP stay NF4: left as they are
    x = torch.tensor(prompts_of([12, 12]))
    copied = sampling_copy(model, torch.float32)
    attn = copied.model.layers[0].self_attn  # k_proj is NF4, so q/k/v stay apart: nothing to fuse there
    assert isinstance(attn.q_proj, PackedLinear) and isinstance(attn.k_proj, NF4Linear)
    torch.testing.assert_close(copied(x), model(x), atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_compiled_decode_step_matches_eager_and_serves_a_new_packed_copy_without_recompiling():
    torch._dynamo.reset()  # a fresh compile cache: the first packed copy compiles the step, the later ones must not
    model = tiny()
    ids = prompts_of([12, 5, 9])
    want = generate(model, ids, 6, NEVER, 0, temperature=0).responses()
    assert generate(sampling_copy(model, torch.float32, pack=False), ids, 6, NEVER, 0, temperature=0,
                    compile=True).responses() == want
    # PPO samples from a new copy of the updated policy each iteration: the packed weights are inputs of the
    # compiled step, so it is reused (no new graph) and reads the new weights, not the old ones
    for iteration in range(3):
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(iteration)) * 0.5)
        want, old = generate(model, ids, 6, NEVER, 0, temperature=0).responses(), want
        assert want != old
        packed = sampling_copy(model, torch.float32)
        graphs = counters["stats"]["unique_graphs"]
        assert generate(packed, ids, 6, NEVER, 0, temperature=0, compile=True).responses() == want
        assert counters["stats"]["unique_graphs"] == graphs + (iteration == 0)
    # PPO --compile --bf16: a copy of a compile_pointwise'd policy; its compiled kernels inline into the step
    assert generate(sampling_copy(compile_pointwise(model), torch.float32), ids, 6, NEVER, 0, temperature=0,
                    compile=True).responses() == want
