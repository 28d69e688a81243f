"""Put LoRALinear around a model's projections, freeze the rest, and report what trains.

`apply_lora` walks the module tree post-order (children before their parent) and swaps every
module for which `filter_fn(module, qualified_name)` holds; by default that is a linear whose
last name component is one of `targets` (HF's projection names, so PEFT's target_modules and our
module paths line up).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn as nn

from lora.lora import LoRALinear
from model.llama import PROJECTIONS

ALL_PROJECTIONS = tuple(p.rsplit(".", 1)[1] for p in PROJECTIONS)  # q_proj ... down_proj: the default targets
FilterFn = Callable[[nn.Module, str], bool]


def is_linear_like(module: nn.Module) -> bool:
    """nn.Linear, Int8Linear, NF4Linear: anything a LoRALinear can wrap."""
    return hasattr(module, "in_features") and hasattr(module, "out_features") \
        and not isinstance(module, LoRALinear)


def name_matches(name: str, target: str) -> bool:
    """PEFT's rule for a target_modules entry: the whole qualified name or a dotted suffix of it."""
    return name == target or name.endswith("." + target)


def target_filter(targets: Iterable[str]) -> FilterFn:
    """filter_fn matching linears whose qualified name ends with one of `targets` (PEFT's rule)."""
    targets = tuple(targets)
    return lambda module, name: is_linear_like(module) and any(name_matches(name, t) for t in targets)


def apply_lora(model: nn.Module, targets: Iterable[str] = ALL_PROJECTIONS, r: int = 32,
               alpha: float = 64, dropout: float = 0.1, rslora: bool = False,
               dtype: torch.dtype = torch.float32, filter_fn: FilterFn | None = None) -> nn.Module:
    """Wrap the targeted linears of `model` in LoRALinear (in place) and freeze everything else.

    Args:
        model: any nn.Module (normally model.llama.Llama, possibly with quantized projections).
        targets: module names to wrap, matched as PEFT does (the qualified name or a dotted suffix:
            "q_proj", "self_attn.q_proj", "model.layers.0.mlp.up_proj"); each must match a linear.
        r, alpha, dropout, rslora, dtype: passed to every LoRALinear.
        filter_fn: (module, qualified_name) -> bool; overrides `targets` when given.
    Returns:
        the same model.
    """
    targets = tuple(targets)
    by_targets = filter_fn is None
    if by_targets:
        if not targets:
            raise ValueError("apply_lora: no target modules given")
        filter_fn = target_filter(targets)
    found: list[tuple[nn.Module, str, nn.Module, str]] = []  # (parent, attr, child, qualified name)

    def walk(module: nn.Module, prefix: str) -> None:
        for name, child in module.named_children():
            qual = f"{prefix}.{name}" if prefix else name
            if isinstance(child, LoRALinear):
                raise ValueError(f"apply_lora: {qual} already has LoRA")
            walk(child, qual)  # post-order: children are matched before their parent
            if filter_fn(child, qual):
                found.append((module, name, child, qual))

    walk(model, "")  # collect first, so a bad target leaves the model untouched
    missing = [t for t in targets if not any(name_matches(q, t) for *_, q in found)] if by_targets else []
    if missing:  # a typo ("qproj") must not silently train fewer layers
        raise ValueError(f"apply_lora: target module(s) {missing} match no linear layer")
    if not found:
        raise ValueError("apply_lora: filter_fn matched no module")
    for parent, name, child, _ in found:
        setattr(parent, name, LoRALinear(child, r, alpha, dropout, rslora, dtype))
    mark_only_lora_trainable(model)
    return model


def remove_lora(model: nn.Module) -> nn.Module:
    """Put every LoRALinear's base layer back in its place (the adapter is dropped, not merged)."""
    for name, m in list(lora_modules(model).items()):
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, m.base_layer)
    return model


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """Qualified name -> LoRALinear, in module order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def mark_only_lora_trainable(model: nn.Module) -> None:
    """requires_grad on lora_A / lora_B only; every other parameter frozen."""
    for name, p in model.named_parameters():
        p.requires_grad_(_is_lora_key(name))


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter tensors: `<module path>.lora_A.weight` (r, in) and `.lora_B.weight` (out, r)."""
    # named_parameters, not state_dict(): no packing of 4-bit quant states on every save.
    return {k: v.detach() for k, v in model.named_parameters() if _is_lora_key(k)}


def _is_lora_key(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def count_params(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts. Quantized weights count as their logical elements:
    an int8 (out, in) weight is out*in; a 4-bit weight packed two per byte is counted as out*in."""
    trainable = total = 0
    seen: set[int] = set()  # a tied lm_head shares embed_tokens.weight: count it once
    for module in model.modules():
        for p in module.parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            n = p.numel()
            if hasattr(p, "quant_state") and hasattr(module, "out_features"):  # bnb Params4bit
                n = module.out_features * module.in_features
            total += n
            trainable += n if p.requires_grad else 0
    return trainable, total


def param_summary(model: nn.Module) -> str:
    """One line: "trainable X / total Y (Z%)"."""
    trainable, total = count_params(model)
    pct = 100.0 * trainable / total if total else 0.0
    return f"trainable {trainable:,} / total {total:,} ({pct:.4f}%)"
