"""The four architectures by name. Model code lives in C++; this file only
turns Python dicts into the JSON configs the C++ registry reads."""
from __future__ import annotations

import copy
import json
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import torch

from . import _C, text
from ._module import CppModule

#: The registered architectures' config names, sorted (from the C++ table).
ARCHITECTURES = tuple(row["name"] for row in _C.architecture_types())
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


class TwoTower(CppModule):
    """Architecture 1: image and text towers in one contrastive embedding space.

    Args:
        config: dict with keys ``image_encoder``, ``text_encoder``, ``embed_dim``,
            ``loss`` ("clip" | "siglip"), ``logit_scale_init``, ``max_logit_scale``,
            ``logit_bias_init``; missing keys take their defaults
            (see ``vlmkit.default_config("two_tower")``).
        **overrides: merged into config (nested dicts merge key by key).

    ``forward(images, token_ids, padding_mask=None, image_sizes=None)`` returns a ``TwoTowerOutput``
    with ``image_embeds``, ``text_embeds``, ``logits_per_image``, ``logits_per_text``
    and ``loss``; ``encode_image``, ``encode_text`` and ``zero_shot`` are also there.
    """

    def __init__(self, config: Optional[Mapping[str, Any]] = None, **overrides: Any) -> None:
        self._wrap(_C.TwoTower(json.dumps(_config("two_tower", config, overrides))))


class TwoLeg(CppModule):
    """Architecture 2: both encoders, a fusion block and a task head.

    Config keys: ``image_encoder``, ``text_encoder``, ``fusion`` (``type``: a name in
    ``vlmkit.FUSIONS``, its fields in ``vlmkit.fusion_types()``), ``head`` (``type``
    "classification" with ``num_classes``, or "matching"), ``label_smoothing``.

    ``forward(images, token_ids, padding_mask=None, labels=None, image_sizes=None)`` returns a
    ``TwoLegOutput`` with ``logits``, ``fused`` and ``loss`` (None without labels).
    """

    def __init__(self, config: Optional[Mapping[str, Any]] = None, **overrides: Any) -> None:
        self._wrap(_C.TwoLeg(json.dumps(_config("two_leg", config, overrides))))


class _Generative:
    """generate() with text prompts for the two generative architectures."""

    def _prompt_ids(self, prompts: Sequence[str], images_per_prompt: bool) -> List[List[int]]:
        if isinstance(prompts, str):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)) or not all(isinstance(p, str) for p in prompts):
            raise TypeError("expected prompts as a str or a list of str")
        concat = self.config["fusion"] == "concat"
        ids = []
        for prompt in prompts:
            # With concat fusion an image needs a placeholder; one image per
            # prompt without one goes first, as LLaVA writes it.
            if concat and images_per_prompt and text.TOKENIZER.image_id not in text.encode(prompt):
                prompt = "<image>" + prompt
            ids.append(text.encode(prompt, add_bos=True, add_eos=False))
        return ids

    @staticmethod
    def _generation_kwargs(max_new_tokens: int, schema: Optional[Mapping[str, Any]], **kwargs: Any) -> Dict[str, Any]:
        schema_json = None
        if schema is not None:
            if not isinstance(schema, Mapping):
                raise TypeError(f"expected schema to be a dict (a JSON schema), got {type(schema).__name__}")
            schema_json = json.dumps(schema)
            # Room for the longest value the schema allows, so the JSON always closes.
            max_new_tokens = max(max_new_tokens, _C.JsonSchemaMatcher.max_length(schema_json) + 1)
        return dict(max_new_tokens=max_new_tokens, schema=schema_json, **kwargs)

    @staticmethod
    def _texts(ids: List[List[int]], return_ids: bool):
        texts = [text.decode([t for t in row if t != text.EOS]) for row in ids]
        return (texts, ids) if return_ids else texts


class EncoderDecoder(_Generative, CppModule):
    """Architecture 4: image encoder, projector, concatenation or cross-attention
    into a next-token text decoder (LLaVA / Flamingo family).

    Config keys: ``image_encoder``, ``projector`` (``type``: a name in
    ``vlmkit.PROJECTORS``, its fields in ``vlmkit.projector_types()``), ``fusion`` ("concat" |
    "cross_attention"), ``decoder``, ``attention`` ("causal" | "prefix_lm"),
    ``image_token_id``, ``label_smoothing``.

    ``forward(images, input_ids, padding_mask=None, labels=None, image_sizes=None)`` returns a
    ``DecoderOutput`` (logits over the fused sequence, loss on answer tokens).

    ``image_sizes`` [B, 2] (all architectures with a ViT): variable-size images
    zero-padded into one batch (``data.collate_images``); padded patches are masked
    and each image gives what it gives alone (dynamic resolution).
    """

    def __init__(self, config: Optional[Mapping[str, Any]] = None, **overrides: Any) -> None:
        self._wrap(_C.EncoderDecoder(json.dumps(_config("encoder_decoder", config, overrides))))

    def generate(self, images: torch.Tensor, prompts, max_new_tokens: int = 32, *,
                 schema: Optional[Mapping[str, Any]] = None, stream: Optional[Callable] = None,
                 return_ids: bool = False, **kwargs: Any):
        """Generates an answer per prompt. ``images`` [I, C, H, W]: with concat fusion
        they fill the ``<image>`` placeholders in order (a prompt without one gets
        one in front); with cross-attention, one image per prompt. Options:
        ``do_sample``, ``temperature``, ``top_k``, ``top_p``, ``num_beams``,
        ``length_penalty``, ``stop_tokens``, ``use_cache``, ``seed``; ``schema`` (a JSON
        schema dict) constrains the output to valid JSON; ``stream(tokens)`` is called
        after each step with the new token of each prompt (-1 when finished) and may
        return False to stop. Returns the texts (and token ids with ``return_ids``)."""
        ids = self._prompt_ids(prompts, images_per_prompt=images.dim() == 4 and
                               images.shape[0] == (1 if isinstance(prompts, str) else len(prompts)))
        tokens, _ = self.cpp_module.generate_ids(
            images, ids, stream=stream, **self._generation_kwargs(max_new_tokens, schema, **kwargs))
        return self._texts(tokens, return_ids)


class EncoderTextDecoder(_Generative, CppModule):
    """Architecture 3: a conv stage on the image and a context text, concatenated
    and encoded together, projected, then joined to the decoder by cross-attention
    or concatenation.

    Config keys: as ``EncoderDecoder`` plus ``text_encoder`` (the joint encoder);
    the image encoder defaults to ``{"type": "conv"}``.
    ``forward(images, context_ids, input_ids, context_padding_mask=None,
    padding_mask=None, labels=None)`` returns a ``DecoderOutput``.
    """

    def __init__(self, config: Optional[Mapping[str, Any]] = None, **overrides: Any) -> None:
        self._wrap(_C.EncoderTextDecoder(json.dumps(_config("encoder_text_decoder", config, overrides))))

    def generate(self, images: torch.Tensor, contexts: Sequence[str], prompts, max_new_tokens: int = 32, *,
                 schema: Optional[Mapping[str, Any]] = None, stream: Optional[Callable] = None,
                 return_ids: bool = False, **kwargs: Any):
        """Like ``EncoderDecoder.generate`` with one context text per image."""
        if isinstance(contexts, str):
            contexts = [contexts]
        max_len = self.config["text_encoder"]["max_len"]
        context_ids, context_mask = text.encode_batch(list(contexts), max_len)
        ids = self._prompt_ids(prompts, images_per_prompt=True)
        tokens, _ = self.cpp_module.generate_ids(
            images, context_ids, ids, stream=stream, context_padding_mask=context_mask,
            **self._generation_kwargs(max_new_tokens, schema, **kwargs))
        return self._texts(tokens, return_ids)


def _architecture_classes() -> Dict[str, type]:
    """Each registered architecture's Python class, by config name."""
    out = {}
    for row in _C.architecture_types():
        cls = globals().get(row["python_class"])
        if not (isinstance(cls, type) and issubclass(cls, CppModule)):
            raise ImportError(f"architecture {row['name']!r} is registered in C++ with Python class "
                              f"{row['python_class']!r}, which vlmkit.models does not define")
        out[row["name"]] = cls
    return out


_CLASSES = _architecture_classes()


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
    return _CLASSES[architecture](merged)


def default_config(architecture: str = DEFAULT_ARCHITECTURE) -> Dict[str, Any]:
    """The complete default config of an architecture."""
    return json.loads(_C.default_config(architecture))
