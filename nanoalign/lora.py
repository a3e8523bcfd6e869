"""LoRA: low-rank adapters on frozen linear layers (Hu et al. 2021, eq. 3), applied by module swap.

    y = W x + (alpha / r) * B A dropout(x)        A: (r, in) Kaiming-uniform, B: (out, r) zeros

B = 0 at init, so a fresh adapter leaves the model unchanged. rsLoRA (Kalajdzievski 2023) scales by
alpha / sqrt(r) instead, which keeps the update size stable as r grows. The base layer may be an nn.Linear or an
NF4Linear (then this is QLoRA, Dettmers et al. 2023). Names follow PEFT (`lora_A`, `lora_B`, adapter_config.json,
adapter_model.safetensors), so an adapter saved here loads in `peft` and the other way round.

Merging, two ways:
- `merge_lora(model)` is final: every LoRALinear becomes a plain nn.Linear holding W + (alpha/r) B A, in full
  precision (an NF4 base is dequantized first). This is what each stage saves.
- `layer.merge()` / `layer.unmerge()` toggle in place and reversibly (the `merged` flag), e.g. for fast sampling.

`with disable_adapter(model):` runs the same module without its adapters: the reference model of DPO / PPO.
"""
import contextlib
import json
import math
import os

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from nanoalign.nf4 import NF4Linear, model_bytes

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PEFT_PREFIX = "base_model.model."  # PEFT's key prefix for a PeftModelForCausalLM


def _to_linear(layer: nn.Module) -> nn.Linear:
    """A full-precision nn.Linear copy of an NF4Linear (dequantized) or an nn.Linear."""
    w = layer.dequantize() if isinstance(layer, NF4Linear) else layer.weight.detach()
    out = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")  # no init
    out.weight = nn.Parameter(w.clone(), requires_grad=False)
    if layer.bias is not None:
        out.bias = nn.Parameter(layer.bias.detach().clone(), requires_grad=False)
    return out


class Dropout(nn.Dropout):
    """nn.Dropout with a cheaper mask on CPU. F.dropout draws one number from the CPU generator per element, and
    that draw cost ~30% of a LoRA training step on CPU (7 masks per block). Here each 64-bit draw is cut into four
    16-bit uniforms, and an element is kept if its uniform is at or above p (p rounded to 1/65536). Same inverted
    scaling 1/(1 - p); other devices use F.dropout (their generators are fast)."""

    def forward(self, x):
        if not self.training or self.p == 0 or x.device.type != "cpu":
            return super().forward(x)
        n = x.numel()
        bits = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-2 ** 63, 2 ** 63 - 1)  # 64 random bits each
        keep = bits.view(torch.int16)[:n].view(x.shape) >= round(self.p * 65536) - 32768  # P(keep) = 1 - p
        return x * keep.to(x.dtype).mul_(1 / (1 - self.p))  # a float mask: no bool->float copy in each pass


class LoRALinear(nn.Module):
    """A frozen `base` linear layer plus a trainable low-rank update."""

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False):
        super().__init__()
        if r <= 0:
            raise ValueError(f"LoRA rank must be positive, got {r}")
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r, self.alpha, self.rslora = r, alpha, rslora
        self.scaling = alpha / math.sqrt(r) if rslora else alpha / r
        self.lora_dropout = Dropout(dropout) if dropout > 0 else nn.Identity()
        ref = base.weight_packed if isinstance(base, NF4Linear) else base.weight
        dtype = base.dtype if isinstance(base, NF4Linear) else base.weight.dtype
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=ref.device, dtype=dtype)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=ref.device, dtype=dtype)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # nn.Linear's default init, as in PEFT
        nn.init.zeros_(self.lora_B.weight)
        self.merged = False  # True while B A is folded into base.weight (merge / unmerge)
        self.disabled = 0  # > 0 inside disable_adapter(); a counter so nested contexts restore correctly

    def delta_weight(self) -> torch.Tensor:
        return self.scaling * (self.lora_B.weight @ self.lora_A.weight)  # (out, in)

    def forward(self, x):
        y = self.base(x)  # (..., out)
        if self.disabled:  # the reference model: base only (a merged adapter is taken back out)
            return y - self.scaling * self.lora_B(self.lora_A(x)) if self.merged else y
        if self.merged:
            return y
        return torch.add(y, self.lora_B(self.lora_A(self.lora_dropout(x))), alpha=self.scaling)  # one pass, no temp

    @torch.no_grad()
    def merge(self):
        """Fold B A into the base weight in place (an NF4 base first becomes a full-precision nn.Linear)."""
        if not self.merged:
            if isinstance(self.base, NF4Linear):
                self.base = _to_linear(self.base)  # adding into 4-bit codes would round the update away
            self.base.weight += self.delta_weight().to(self.base.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if self.merged:
            self.base.weight -= self.delta_weight().to(self.base.weight.dtype)
            self.merged = False

    def extra_repr(self):
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}, merged={self.merged}"


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def apply_lora(model: nn.Module, r: int, alpha: float, dropout: float = 0.0, targets=ALL_LINEAR,
               rslora: bool = False, trainable=()) -> nn.Module:
    """Freeze every parameter, then wrap each linear layer whose attribute name is in `targets` in a LoRALinear.

    trainable: names of extra modules trained in full (PEFT's modules_to_save), e.g. "score" for a reward model.
    Note lm_head is tied to embed_tokens in SmolLM2, so "lm_head" trains the embedding too.
    """
    targets = (targets,) if isinstance(targets, str) else tuple(targets)
    trainable = (trainable,) if isinstance(trainable, str) else tuple(trainable)
    if lora_layers(model):
        raise ValueError("model already has LoRA adapters (merge_lora first)")
    for p in model.parameters():
        p.requires_grad_(False)
    counts = {}  # a tied weight (lm_head = embed_tokens) cannot be merged in place without changing the other
    for _, p in model.named_parameters(remove_duplicate=False):
        counts[id(p)] = counts.get(id(p), 0) + 1

    def swap(module: nn.Module, prefix: str):
        for name, child in module.named_children():
            if name in targets and isinstance(child, (nn.Linear, NF4Linear)):
                if isinstance(child, nn.Linear) and counts[id(child.weight)] > 1:
                    raise ValueError(f"{prefix}{name}: weight is tied to another module; LoRA on it is unsupported")
                setattr(module, name, LoRALinear(child, r, alpha, dropout, rslora))
            else:
                swap(child, f"{prefix}{name}.")

    swap(model, "")
    if not lora_layers(model):
        raise ValueError(f"no linear layer matches the LoRA targets {tuple(targets)}")
    found = set()
    for name, module in model.named_modules():
        if name in trainable or name.rsplit(".", 1)[-1] in trainable:
            module.requires_grad_(True)
            found.add(name.rsplit(".", 1)[-1])
    missing = {t.rsplit(".", 1)[-1] for t in trainable} - found
    if missing:
        raise ValueError(f"trainable modules not found in the model: {sorted(missing)}")
    # what save_adapter writes to adapter_config.json
    model.lora_config = dict(r=r, lora_alpha=alpha, lora_dropout=dropout, use_rslora=rslora,
                             target_modules=sorted({n.rsplit(".", 1)[-1] for n in lora_layers(model)}),
                             modules_to_save=sorted(trainable) or None)
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every LoRALinear by a plain full-precision nn.Linear with W + (alpha/r) B A (frozen). Final."""
    def swap(module: nn.Module):
        for name, child in module.named_children():
            if isinstance(child, LoRALinear):
                with torch.no_grad():
                    merged = _to_linear(child.base)
                    if not child.merged:
                        merged.weight += child.delta_weight().to(merged.weight.dtype)
                setattr(module, name, merged)
            else:
                swap(child)

    swap(model)
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


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def lora_summary(model: nn.Module) -> str:
    """One line: trainable vs total parameters and their storage (an NF4 weight counts as out*in params)."""
    trainable = trainable_parameters(model)
    n_train = sum(p.numel() for p in trainable)
    mb_train = sum(p.numel() * p.element_size() for p in trainable) / 2**20
    n_total = sum(p.numel() for p in model.parameters())
    n_total += sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, NF4Linear))
    return (f"trainable {n_train:,} / {n_total:,} params ({100 * n_train / max(n_total, 1):.2f}%), "
            f"{mb_train:.1f} MB / {model_bytes(model) / 2**20:.1f} MB")


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter (and any `trainable` modules) under PEFT key names, e.g.
    base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight."""
    if not hasattr(model, "lora_config"):
        raise ValueError("model has no LoRA adapter (apply_lora first)")
    sd = {}
    for name, layer in lora_layers(model).items():
        sd[f"{PEFT_PREFIX}{name}.lora_A.weight"] = layer.lora_A.weight
        sd[f"{PEFT_PREFIX}{name}.lora_B.weight"] = layer.lora_B.weight
    keep = model.lora_config["modules_to_save"] or ()
    for name, module in model.named_modules():
        if name in keep or name.rsplit(".", 1)[-1] in keep:
            for pname, p in module.named_parameters():
                sd[f"{PEFT_PREFIX}{name}.{pname}"] = p
    return {k: v.detach().contiguous().clone() for k, v in sd.items()}  # clone: safetensors refuses tied tensors


def save_adapter(model: nn.Module, out_dir: str, base_model_name_or_path: str | None = None):
    """Write adapter_config.json + adapter_model.safetensors in PEFT's layout."""
    sd = adapter_state_dict(model)
    os.makedirs(out_dir, exist_ok=True)
    save_file(sd, os.path.join(out_dir, "adapter_model.safetensors"))
    cfg = dict(model.lora_config)
    cfg.update(peft_type="LORA", task_type="CAUSAL_LM", bias="none", fan_in_fan_out=False, inference_mode=True,
               init_lora_weights=True, base_model_name_or_path=base_model_name_or_path, revision=None,
               layers_to_transform=None, layers_pattern=None, rank_pattern={}, alpha_pattern={}, use_dora=False)
    with open(os.path.join(out_dir, "adapter_config.json"), "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)


def load_adapter(model: nn.Module, adapter_dir: str) -> nn.Module:
    """Load a PEFT LoRA adapter (ours or peft's). Applies LoRA from adapter_config.json if the model has none."""
    with open(os.path.join(adapter_dir, "adapter_config.json")) as f:
        cfg = json.load(f)
    if cfg.get("peft_type") != "LORA" or cfg.get("use_dora") or not isinstance(cfg.get("target_modules"), list):
        raise ValueError(f"{adapter_dir}: only plain LoRA adapters with a list of target_modules are supported")
    if not lora_layers(model):
        apply_lora(model, cfg["r"], cfg["lora_alpha"], cfg.get("lora_dropout", 0.0), tuple(cfg["target_modules"]),
                   cfg.get("use_rslora", False), tuple(cfg.get("modules_to_save") or ()))
    sd = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
    expected = adapter_state_dict(model)
    if set(sd) != set(expected):
        bad = sorted(set(sd) ^ set(expected))[:3]
        raise ValueError(f"{adapter_dir}: adapter keys do not match the model, e.g. {bad}")
    own = dict(model.named_parameters(remove_duplicate=False))  # tied lm_head.weight too
    with torch.no_grad():
        for key, value in sd.items():
            p = own[key.removeprefix(PEFT_PREFIX)]
            if p.shape != value.shape:
                raise ValueError(f"{adapter_dir}: {key} has shape {tuple(value.shape)}, model wants {tuple(p.shape)}")
            p.copy_(value)
    return model
