"""LoRA fine-tuning (Hu et al. 2021) of any vlmkit model, the way PEFT does it.

Adapters live inside the C++ layers (``vlmkit::Linear``), so the C++ Trainer,
``torch.optim`` loops, checkpoints, generation and DDP all see them::

    model = vlmkit.checkpoint.load_model("runs/vlm")         # a trained base
    vlmkit.lora.apply(model, rank=8, target_modules=["q_proj", "v_proj"])
    opt = torch.optim.AdamW(vlmkit.lora.trainable_parameters(model), lr=1e-3)
    ...                                                      # only adapters change
    vlmkit.lora.save(model, "runs/lora/adapter")             # PEFT-style folder
    vlmkit.lora.load(base, "runs/lora/adapter")              # onto the same base
    vlmkit.lora.merge(base)                                  # fold in for inference

``target_modules`` entries name Linear layers by dotted path or by their last
components (``"q_proj"``, ``"self_attn.q_proj"``); ``*`` matches any run of
characters (``"decoder.*_proj"``). The adapter output is scaled by alpha / rank;
A starts Kaiming-uniform and B at zero, so attaching changes no output.
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Sequence

import torch

from . import _C

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


def _cpp(model: Any) -> Any:
    cpp = getattr(model, "cpp_module", None)
    if cpp is None:
        raise TypeError(f"expected a vlmkit model (vlmkit.build_model, vlmkit.EncoderDecoder, ...), "
                        f"got {type(model).__name__}")
    return cpp


def apply(model: torch.nn.Module, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0,
          target_modules: Sequence[str] = DEFAULT_TARGETS, freeze_base: bool = True) -> List[str]:
    """Attaches a rank-``rank`` adapter to every selected Linear layer and (with
    ``freeze_base``) freezes every other parameter. Returns the adapted layers'
    paths. ValueError when an entry selects no layer (the message lists them)."""
    if isinstance(target_modules, str):
        target_modules = [target_modules]
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise TypeError(f"rank must be an int, got {type(rank).__name__}")
    return _C.lora_apply(_cpp(model), rank, float(alpha), float(dropout), list(target_modules), bool(freeze_base))


def layers(model: torch.nn.Module) -> List[str]:
    """Paths of the layers that carry an adapter (empty without adapters)."""
    return _C.lora_layers(_cpp(model))


def merged(model: torch.nn.Module) -> bool:
    return _C.lora_merged(_cpp(model))


def merge(model: torch.nn.Module) -> None:
    """W += alpha / r * B A in every adapted layer (same outputs, no adapter cost)."""
    _C.lora_merge(_cpp(model))


def unmerge(model: torch.nn.Module) -> None:
    _C.lora_unmerge(_cpp(model))


def remove(model: torch.nn.Module, merge: bool = True) -> None:
    """Detaches every adapter, folding it into the weights first when ``merge``;
    the model is the base architecture again (its state_dict loads without LoRA)."""
    _C.lora_remove(_cpp(model), bool(merge))


def config(model: torch.nn.Module) -> Dict[str, Any]:
    """The adapters' adapter_config.json (PEFT's fields: peft_type, r, lora_alpha, ...)."""
    return _C.lora_config(_cpp(model))


def state_dict(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """Adapter tensors under PEFT's names (``base_model.model.<path>.lora_A.weight``)."""
    return _C.lora_state(_cpp(model))


def trainable_parameters(model: torch.nn.Module) -> List[torch.nn.Parameter]:
    """What an optimizer should get: the parameters that require gradients."""
    return [p for p in model.parameters() if p.requires_grad]


def save(model: torch.nn.Module, directory: str) -> str:
    """Writes ``directory/{adapter_model.safetensors, adapter_config.json}``
    atomically; returns the folder's path."""
    return _C.lora_save(os.fspath(directory), _cpp(model))


def load(model: torch.nn.Module, directory: str) -> List[str]:
    """Attaches the adapters an adapter folder describes (if the model has none)
    and loads their tensors; returns the adapted layers. ValueError when the
    adapter was trained on another base (names or shapes differ)."""
    _C.lora_load(_cpp(model), os.fspath(directory))
    return layers(model)


__all__ = ["DEFAULT_TARGETS", "apply", "config", "layers", "load", "merge", "merged", "remove", "save",
           "state_dict", "trainable_parameters", "unmerge"]
