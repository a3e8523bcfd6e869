"""LoRA: low-rank adapters on frozen linear layers (Hu et al. 2021, eq. 3), applied by module swap.

    y = W x + (alpha / r) * B A dropout(x)        A: (r, in) Kaiming-uniform, B: (out, r) zeros

B = 0 at init, so a fresh adapter leaves the model unchanged. The base layer may be an nn.Linear or an NF4Linear
(then this is QLoRA, Dettmers et al. 2023). Names follow PEFT (`lora_A`, `lora_B`, adapter_config.json,
adapter_model.safetensors), so an adapter saved here loads in `peft` and the other way round. `merge_lora` folds
B A into W (what each stage saves); `with disable_adapter(model):` is the reference model of DPO and PPO.
"""
import collections
import contextlib
import json
import math
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from .nf4 import NF4Linear

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PEFT_PREFIX = "base_model.model."  # PEFT's key prefix for a PeftModelForCausalLM


class LoRALinear(nn.Module):
    """A frozen `base` linear layer plus a trainable low-rank update."""

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.scaling = alpha / r
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        nf4 = isinstance(base, NF4Linear)
        device, dtype = (base.weight_packed.device, base.dtype) if nf4 else (base.weight.device, base.weight.dtype)
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=device, dtype=dtype)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # nn.Linear's default init, as in PEFT
        nn.init.zeros_(self.lora_B.weight)
        self.disabled = 0  # > 0 inside disable_adapter(); a counter so nested contexts restore correctly

    def forward(self, x):  # disabled: the reference model, the base alone; else y + s·BAx in one pass, no temporary
        y = self.base(x)  # (..., out)
        return y if self.disabled else torch.add(y, self.lora_B(self.lora_A(self.lora_dropout(x))), alpha=self.scaling)


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def apply_lora(model: nn.Module, r: int, alpha: float, dropout: float = 0.0, targets=ALL_LINEAR,
               trainable=()) -> nn.Module:
    """Freeze every parameter, then wrap each linear layer whose attribute name is in `targets` in a LoRALinear.
    trainable: names of extra modules trained in full (PEFT's modules_to_save), e.g. "score" for a reward model."""
    model.requires_grad_(False)
    uses = collections.Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    for module in list(model.modules()):
        for name, child in module.named_children():
            if name in targets and isinstance(child, (nn.Linear, NF4Linear)):
                if isinstance(child, nn.Linear) and uses[id(child.weight)] > 1:  # lm_head = embed_tokens
                    raise ValueError(f"{name}: weight is tied to another module; LoRA on it is unsupported")
                setattr(module, name, LoRALinear(child, r, alpha, dropout))
    if not lora_layers(model):
        raise ValueError(f"no linear layer matches the LoRA targets {tuple(targets)}")
    for t in trainable:
        found = [m for n, m in model.named_modules() if n == t or n.rsplit(".", 1)[-1] == t]
        if not found:
            raise ValueError(f"trainable module not found in the model: {t}")
        for m in found:
            m.requires_grad_(True)
    model.lora_config = dict(r=r, lora_alpha=alpha, lora_dropout=dropout, use_rslora=False,  # for save_adapter
                             target_modules=sorted({n.rsplit(".", 1)[-1] for n in lora_layers(model)}),
                             modules_to_save=sorted(trainable) or None)
    return model


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every LoRALinear by a frozen full-precision nn.Linear holding W + (alpha/r) B A, in place."""
    for module in list(model.modules()):
        for name, child in module.named_children():
            if isinstance(child, LoRALinear):
                base = child.base  # an NF4 base is dequantized: adding into 4-bit codes would round the update away
                w = base.dequantize() if isinstance(base, NF4Linear) else base.weight
                merged = nn.Linear(child.in_features, child.out_features, base.bias is not None, device="meta")
                delta = child.scaling * (child.lora_B.weight @ child.lora_A.weight)  # (alpha/r) B A, (out, in)
                merged.weight = nn.Parameter(w + delta.to(w.dtype), requires_grad=False)
                merged.bias = None if base.bias is None else nn.Parameter(base.bias.clone(), requires_grad=False)
                setattr(module, name, merged)
    model.__dict__.pop("lora_config", None)
    return model


@contextlib.contextmanager
def disable_adapter(model: nn.Module):
    """`with disable_adapter(policy):` runs the frozen base model (the reference). Nesting-safe.
    Modules trained in full via `trainable` stay as trained (unlike PEFT, no original copy is kept)."""
    layers = list(lora_layers(model).values())
    for layer in layers:
        layer.disabled += 1
    try:
        yield model
    finally:
        for layer in layers:
            layer.disabled -= 1


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter (and any `trainable` modules) under PEFT's key names: base_model.model.<our parameter name>."""
    keep = {"lora_A", "lora_B", *(model.lora_config["modules_to_save"] or ())}
    return {PEFT_PREFIX + n: p.detach().contiguous().clone()  # clone: safetensors refuses tied tensors
            for n, p in model.named_parameters(remove_duplicate=False) if keep & set(n.split(".")[:-1])}


def save_adapter(model: nn.Module, out_dir: str, base_model_name_or_path: str | None = None):
    """Write adapter_config.json + adapter_model.safetensors in PEFT's layout."""
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    save_file(adapter_state_dict(model), Path(out_dir, "adapter_model.safetensors"))
    cfg = dict(model.lora_config, peft_type="LORA", task_type="CAUSAL_LM", bias="none", fan_in_fan_out=False,
               inference_mode=True, init_lora_weights=True, base_model_name_or_path=base_model_name_or_path,
               revision=None, layers_to_transform=None, layers_pattern=None, rank_pattern={}, alpha_pattern={},
               use_dora=False)
    Path(out_dir, "adapter_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))


@torch.no_grad()
def load_adapter(model: nn.Module, adapter_dir: str) -> nn.Module:
    """Load a PEFT LoRA adapter (ours or peft's). Applies LoRA from adapter_config.json if the model has none."""
    cfg = json.loads(Path(adapter_dir, "adapter_config.json").read_text())
    if (cfg.get("peft_type") != "LORA" or cfg.get("use_dora") or cfg.get("use_rslora")
            or not isinstance(cfg.get("target_modules"), list)):
        raise ValueError(f"{adapter_dir}: only plain LoRA (no DoRA, no rsLoRA, target_modules a list) is supported")
    if not lora_layers(model):
        apply_lora(model, cfg["r"], cfg["lora_alpha"], cfg.get("lora_dropout", 0.0), tuple(cfg["target_modules"]),
                   tuple(cfg.get("modules_to_save") or ()))
    sd = load_file(Path(adapter_dir, "adapter_model.safetensors"))
    # shapes too: copy_ would broadcast an r = 1 adapter into an r = 4 model without a word
    have, want = ({(k, tuple(v.shape)) for k, v in d.items()} for d in (sd, adapter_state_dict(model)))
    if have != want:
        raise ValueError(f"{adapter_dir}: adapter keys or shapes do not match the model: {sorted(have ^ want)[:3]}")
    own = dict(model.named_parameters(remove_duplicate=False))  # tied lm_head.weight too
    for key, value in sd.items():
        own[key.removeprefix(PEFT_PREFIX)].copy_(value)
    return model
