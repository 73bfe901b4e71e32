"""The four architectures by name. Model code lives in C++; this file only
turns Python dicts into the JSON configs the C++ registry reads."""
from __future__ import annotations

import copy
import json
from typing import Any, Dict, Mapping, Optional

import torch

from . import _C
from ._module import CppModule

ARCHITECTURES = ("two_tower", "two_leg", "encoder_text_decoder", "encoder_decoder")
DEFAULT_ARCHITECTURE = "two_tower"


def _merge(base: Dict[str, Any], extra: Mapping[str, Any]) -> Dict[str, Any]:
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = copy.deepcopy(value)
    return base


def _config(architecture: str, config: Optional[Mapping[str, Any]], overrides: Mapping[str, Any]) -> Dict[str, Any]:
    if config is not None and not isinstance(config, Mapping):
        raise TypeError(f"expected config to be a dict, got {type(config).__name__}")
    merged = _merge(copy.deepcopy(dict(config or {})), overrides)
    given = merged.setdefault("architecture", architecture)
    if given != architecture:
        raise ValueError(f"config says architecture {given!r} but {architecture!r} is being built")
    return merged


class TwoTower(CppModule, _C.TwoTower):
    """Architecture 1: image and text towers in one contrastive embedding space.

    Args:
        config: dict with keys ``image_encoder``, ``text_encoder``, ``embed_dim``,
            ``loss`` ("clip" | "siglip"), ``logit_scale_init``, ``max_logit_scale``,
            ``logit_bias_init``; missing keys take their defaults
            (see ``vlmkit.default_config("two_tower")``).
        **overrides: merged into config (nested dicts merge key by key).

    ``forward(images, token_ids, padding_mask=None)`` returns a ``TwoTowerOutput``
    with ``image_embeds``, ``text_embeds``, ``logits_per_image``, ``logits_per_text``
    and ``loss``; ``encode_image``, ``encode_text`` and ``zero_shot`` are also there.
    """

    def __init__(self, config: Optional[Mapping[str, Any]] = None, **overrides: Any) -> None:
        _C.TwoTower.__init__(self, json.dumps(_config("two_tower", config, overrides)))
        self._finish_init()


class TwoLeg(CppModule, _C.TwoLeg):
    """Architecture 2: both encoders, a fusion block and a task head.

    Config keys: ``image_encoder``, ``text_encoder``, ``fusion`` (``type`` one of
    "concat_mlp", "attention", "gated", "cross_attention"), ``head`` (``type``
    "classification" with ``num_classes``, or "matching"), ``label_smoothing``.

    ``forward(images, token_ids, padding_mask=None, labels=None)`` returns a
    ``TwoLegOutput`` with ``logits``, ``fused`` and ``loss`` (None without labels).
    """

    def __init__(self, config: Optional[Mapping[str, Any]] = None, **overrides: Any) -> None:
        _C.TwoLeg.__init__(self, json.dumps(_config("two_leg", config, overrides)))
        self._finish_init()


_CLASSES = {"two_tower": TwoTower, "two_leg": TwoLeg}


def build_model(config: Optional[Mapping[str, Any]] = None, **overrides: Any) -> torch.nn.Module:
    """Builds a model from a config dict; ``config["architecture"]`` picks one of
    ``ARCHITECTURES`` (default "two_tower"). ``build_model(model.config)`` rebuilds
    the same architecture."""
    if config is not None and not isinstance(config, Mapping):
        raise TypeError(f"expected config to be a dict, got {type(config).__name__}")
    merged = _merge(copy.deepcopy(dict(config or {})), overrides)
    architecture = merged.get("architecture", DEFAULT_ARCHITECTURE)
    if architecture not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {architecture!r}; expected one of "
                         + ", ".join(repr(a) for a in ARCHITECTURES))
    if architecture not in _CLASSES:
        raise NotImplementedError(f"architecture {architecture!r} is not implemented in this "
                                  f"version of vlmkit; available: "
                                  + ", ".join(repr(a) for a in _CLASSES))
    return _CLASSES[architecture](merged)


def default_config(architecture: str = DEFAULT_ARCHITECTURE) -> Dict[str, Any]:
    """The complete default config of an architecture."""
    return json.loads(_C.default_config(architecture))
