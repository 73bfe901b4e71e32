"""ONNX export of vlmkit models (docs/deploy.md).

    files = vlmkit.export.onnx(model, "export/vlm")       # or: vlmkit export --checkpoint runs/vlm

What is written, per architecture (every graph has dynamic batch and sequence axes):

- ``encoder_decoder`` (LLaVA / Flamingo style), the layout ONNX Runtime clients
  such as Transformers.js use for VLMs:
  ``vision.onnx``   images [B, 3, H, W] -> image_embeds [B, M, D] (encoder + projector)
  ``embed.onnx``    input_ids [B, T] -> inputs_embeds [B, T, D]
  ``prefill.onnx``  inputs_embeds [B, T, D] (+ image_embeds for cross-attention)
                    -> logits [B, T, V], present.{i}.key/value [B, Hkv, T, Dh]
  ``decode.onnx``   input_ids [B, 1], past.{i}.key/value [B, Hkv, P, Dh] (+ image_embeds)
                    -> logits [B, 1, V], present.{i}.key/value [B, H, P + 1, Dh]
  With concat fusion the client splices image_embeds in place of each prompt's
  ``<image>`` embedding before prefill (tools/onnxruntime/generate.js does).
- ``encoder_text_decoder``: ``encode.onnx`` (images, context_ids -> image_embeds,
  the memory [B, M + C, D], and memory_mask [B, M + C], true = padded context)
  replaces vision.onnx; embed, prefill and decode as above (with cross-attention
  prefill and decode also take memory_mask).
- ``two_tower``: ``image_encoder.onnx`` (images -> unit image_embeds) and
  ``text_encoder.onnx`` (input_ids -> unit text_embeds); logits are their dot
  product times ``logit_scale`` (in ``export.json``).
- ``two_leg``: ``model.onnx`` (images, input_ids -> logits) plus both encoders.

How: the C++ modules trace, but LibTorch bakes every shape it reads into the
trace (a graph for one batch size and one length), so the graphs are traced
from vlmkit's pure-PyTorch mirror of the same architecture
(``vlmkit.bench.peers``) with the model's weights copied in. Before anything is
written the mirror is checked against the model itself (logits within 1e-4 on
a batch of the model's own shape), so an export never silently differs from
the model. Configurations the mirror does not implement (gated cross-attention,
the SigLIP loss, other Two-Leg fusions, learned decoder positions, untied
embeddings) raise NotImplementedError naming the setting. LoRA adapters are merged into the
exported weights (the model itself is left as it was).
"""
from __future__ import annotations

import json
import math
import os
import warnings
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import lora as _lora
from . import text as _text
from .bench.peers import repeat_heads as _repeat_heads

DEFAULT_OPSET = 14


def _mirror(model: nn.Module) -> nn.Module:
    """The pure-PyTorch mirror of ``model`` with its weights (adapters merged)."""
    from .bench import peers

    config = model.config
    arch = config.get("architecture")
    if arch not in peers.MIRRORS:
        raise NotImplementedError(f"ONNX export of {arch!r} models is not built yet (export handles "
                                  f"{sorted(peers.MIRRORS)})")
    missing = peers.unmirrored(config)
    if missing:
        raise NotImplementedError(f"ONNX export does not implement {', '.join(missing)}")
    source = model
    if _lora.layers(model):  # a copy with the adapters folded in
        from . import _C, build_model
        source = build_model(config)
        _C.lora_apply_config(source.cpp_module, _lora.config(model))
        source.load_state_dict(model.state_dict())
        _lora.remove(source, merge=True)
    mirror = peers.MIRRORS[arch](config).eval()
    ours, theirs = list(source.named_parameters()), list(mirror.named_parameters())
    if [tuple(p.shape) for _, p in ours] != [tuple(p.shape) for _, p in theirs]:
        raise NotImplementedError(f"the {arch} mirror's parameters do not line up with the model's; "
                                  "this configuration cannot be exported")
    with torch.no_grad():
        for (_, a), (_, b) in zip(ours, theirs):
            b.copy_(a)
    for p in mirror.parameters():
        p.requires_grad_(False)
    return mirror


def _etd_sample(config: Dict[str, Any], batch: int):
    """Images, context ids (no padding) and prompts with one <image> for an encoder_text_decoder."""
    g = torch.Generator().manual_seed(1)
    size = config["image_encoder"]["image_size"]
    text_vocab = min(config["text_encoder"]["vocab_size"], 260)
    images = torch.rand(batch, 3, size, size, generator=g)
    context = torch.randint(8, text_vocab, (batch, 7), generator=g)
    ids = torch.randint(8, min(config["decoder"]["vocab_size"], 260), (batch, 9), generator=g)
    ids[:, 0], ids[:, 2] = _text.BOS, config.get("image_token_id", _text.IMAGE)
    return images, context, ids


def _check_mirror(model: nn.Module, mirror: nn.Module) -> float:
    """Largest |mirror - model| on a sample batch; raises if above 1e-4."""
    from .bench import suite

    arch = model.config["architecture"]
    was_training = model.training
    model.eval()
    with torch.no_grad():
        if arch == "encoder_text_decoder":
            images, context, ids = _etd_sample(model.config, 2)
            ours, theirs = model(images, context, ids).logits, mirror(images, context, ids)[0]
        else:
            images, ids, _ = suite.batch_for(model.config, 2, 12, seed=1)
            out = model(images, ids) if arch == "two_tower" else model(images, ids, None, None)
            ours = out.logits_per_image if arch == "two_tower" else out.logits
            theirs = mirror(images, ids)[0]
    model.train(was_training)
    diff = (ours - theirs).abs().max().item()
    if not diff <= 1e-4:
        raise RuntimeError(f"export: the pure-PyTorch mirror differs from the model by {diff:.2e} (> 1e-4); "
                           "not exporting")
    return diff


# ------------------------------------------------------------------ decoder graphs
def _rotary(x: torch.Tensor, positions: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
    """Rotate-half rotary embedding of x [B, H, T, Dh] at positions [B, T] (vlmkit's convention)."""
    dh = x.shape[-1]
    freqs = theta ** (-torch.arange(0, dh, 2, dtype=torch.float32) / dh)
    angles = positions.float()[..., None] * freqs  # [B, T, Dh/2]
    cos, sin = angles.cos()[:, None], angles.sin()[:, None]
    x1, x2 = x[..., : dh // 2], x[..., dh // 2:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1)


def _attend(q, k, v, mask=None):
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores.masked_fill(mask, torch.finfo(scores.dtype).min)
    return scores.softmax(-1) @ v


def _heads(linear: nn.Linear, x: torch.Tensor, heads: int) -> torch.Tensor:
    b, t = x.shape[0], x.shape[1]
    y = linear(x)
    return y.view(b, t, heads, y.shape[-1] // heads).transpose(1, 2)


def _run_decoder(decoder: nn.Module, x: torch.Tensor, positions: torch.Tensor, past: List[torch.Tensor],
                 context: Optional[torch.Tensor], mask: Optional[torch.Tensor],
                 context_mask: Optional[torch.Tensor] = None):
    """The mirror's decoder written out step by step, with explicit past/present keys."""
    presents: List[torch.Tensor] = []
    for i, block in enumerate(decoder.blocks):
        attn = block.self_attn
        h = block.norm1(x)
        b, t, d = h.shape
        q, k, v = _heads(attn.q_proj, h, attn.h), _heads(attn.k_proj, h, attn.kv), _heads(attn.v_proj, h, attn.kv)
        if attn.qk_norm:
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k = _rotary(q, positions, attn.theta), _rotary(k, positions, attn.theta)
        if past:
            k = torch.cat([past[2 * i], k], 2)
            v = torch.cat([past[2 * i + 1], v], 2)
        presents += [k, v]  # [B, Hkv, S, Dh]: grouped-query attention caches only the key/value heads
        if attn.kv != attn.h:
            k, v = _repeat_heads(k, attn.h // attn.kv), _repeat_heads(v, attn.h // attn.kv)
        x = x + attn.out_proj(_attend(q, k, v, mask).transpose(1, 2).reshape(b, t, d))
        if block.cross:
            cross = block.cross_attn
            hc = block.norm_cross(x)
            qc = _heads(cross.q_proj, hc, cross.h)
            kc, vc = _heads(cross.k_proj, context, cross.h), _heads(cross.v_proj, context, cross.h)
            if cross.qk_norm:
                qc, kc = cross.q_norm(qc), cross.k_norm(kc)
            blocked = None if context_mask is None else context_mask[:, None, None, :]
            x = x + cross.out_proj(_attend(qc, kc, vc, blocked).transpose(1, 2).reshape(b, t, d))
        x = x + block.mlp(block.norm2(x))
    logits = decoder.norm(x) @ decoder.token_embed.weight.t()
    return logits, presents


class _Vision(nn.Module):
    def __init__(self, mirror):
        super().__init__()
        self.mirror = mirror

    def forward(self, images):
        return self.mirror.encode_images(images)


class _Encode(nn.Module):
    """encoder_text_decoder: images and context text -> memory and its padding mask."""

    def __init__(self, mirror):
        super().__init__()
        self.mirror = mirror

    def forward(self, images, context_ids):
        return self.mirror.encode(images, context_ids)


class _Embed(nn.Module):
    def __init__(self, mirror):
        super().__init__()
        self.token_embed = mirror.decoder.token_embed

    def forward(self, input_ids):
        return self.token_embed(input_ids)


class _Prefill(nn.Module):
    def __init__(self, mirror):
        super().__init__()
        self.decoder, self.prefix_lm, self.concat = mirror.decoder, mirror.prefix_lm, mirror.concat

    def forward(self, inputs_embeds, image_embeds=None, memory_mask=None):
        t = inputs_embeds.shape[1]
        positions = torch.ones_like(inputs_embeds[:, :, 0], dtype=torch.long).cumsum(1) - 1
        # Generation's prefill: prefix-LM lets the whole prompt attend both ways.
        mask = None if self.prefix_lm else torch.ones(t, t, dtype=torch.bool).triu(1)
        logits, presents = _run_decoder(self.decoder, inputs_embeds, positions, [], image_embeds, mask, memory_mask)
        return (logits, *presents)


class _Decode(nn.Module):
    def __init__(self, mirror):
        super().__init__()
        self.decoder, self.concat = mirror.decoder, mirror.concat

    def forward(self, input_ids, *rest):
        depth = len(self.decoder.blocks)
        past, extra = list(rest[:2 * depth]), list(rest[2 * depth:]) + [None, None]
        image_embeds, memory_mask = (None, None) if self.concat else (extra[0], extra[1])
        x = self.decoder.token_embed(input_ids)
        positions = torch.ones_like(input_ids).cumsum(1) - 1 + past[0].shape[2]
        logits, presents = _run_decoder(self.decoder, x, positions, past, image_embeds, None, memory_mask)
        return (logits, *presents)


class _TowerImage(nn.Module):
    def __init__(self, mirror):
        super().__init__()
        self.image_encoder, self.image_proj = mirror.image_encoder, mirror.image_proj

    def forward(self, images):
        return F.normalize(self.image_proj(self.image_encoder(images)[1]), dim=-1)


class _TowerText(nn.Module):
    def __init__(self, mirror):
        super().__init__()
        self.text_encoder, self.text_proj = mirror.text_encoder, mirror.text_proj

    def forward(self, input_ids):
        return F.normalize(self.text_proj(self.text_encoder(input_ids)), dim=-1)


class _Pooled(nn.Module):
    def __init__(self, encoder, image: bool):
        super().__init__()
        self.encoder, self.image = encoder, image

    def forward(self, x):
        return self.encoder(x)[1] if self.image else self.encoder(x)


class _TwoLeg(nn.Module):
    def __init__(self, mirror):
        super().__init__()
        self.mirror = mirror

    def forward(self, images, input_ids):
        return self.mirror(images, input_ids)[0]


# ------------------------------------------------------------------ writing
def _write(module: nn.Module, args: Tuple[torch.Tensor, ...], path: str, inputs: List[str], outputs: List[str],
           axes: Dict[str, Dict[int, str]], opset: int) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes on shape arithmetic it records dynamically
        torch.onnx.export(module, args, path, input_names=inputs, output_names=outputs, dynamic_axes=axes,
                          opset_version=opset, do_constant_folding=True)


def _check_onnx(path: str) -> None:
    try:
        import onnx
    except ImportError:  # the checker is optional at run time (python3-onnx)
        return
    onnx.checker.check_model(onnx.load(path))


def onnx(model: nn.Module, directory: str, opset: int = DEFAULT_OPSET, check: bool = True) -> Dict[str, Any]:
    """Exports ``model`` to ONNX graphs under ``directory`` (see the module
    docstring for the files) and writes ``export.json`` describing them (inputs,
    outputs, token ids, image size, depth and heads for the KV cache). With
    ``check`` each graph passes onnx's checker when the onnx package is
    installed. Returns export.json's content."""
    if not hasattr(model, "cpp_module"):
        raise TypeError(f"export.onnx: expected a vlmkit model, got {type(model).__name__}")
    config = model.config
    arch = config["architecture"]
    mirror = _mirror(model)
    difference = _check_mirror(model, mirror)
    os.makedirs(directory, exist_ok=True)
    size = config["image_encoder"]["image_size"]
    images = torch.rand(2, 3, size, size)
    spec: Dict[str, Any] = {"format": "vlmkit-onnx", "version": 1, "architecture": arch, "opset": opset,
                            "image_size": size, "config": config, "mirror_max_difference": difference,
                            "graphs": {}}
    batch = {0: "batch"}

    def add(name, module, args, inputs, outputs, axes):
        path = os.path.join(directory, f"{name}.onnx")
        _write(module, args, path, inputs, outputs, axes, opset)
        if check:
            _check_onnx(path)
        spec["graphs"][name] = {"file": f"{name}.onnx", "inputs": inputs, "outputs": outputs,
                                "bytes": os.path.getsize(path)}

    if arch in ("encoder_decoder", "encoder_text_decoder"):
        dec = config["decoder"]
        depth, heads = dec["depth"], dec["num_heads"]
        concat = mirror.concat
        spec.update({"fusion": "concat" if concat else "cross_attention", "depth": depth, "num_heads": heads,
                     "num_kv_heads": dec.get("num_kv_heads") or heads,
                     "head_dim": dec["d_model"] // heads, "vocab_size": dec["vocab_size"],
                     "prefix_lm": mirror.prefix_lm, "bos_id": _text.BOS, "eos_id": _text.EOS,
                     "pad_id": _text.PAD, "image_token_id": config.get("image_token_id", _text.IMAGE)})
        memory_axes = {0: "batch"}
        masked = arch == "encoder_text_decoder"  # the memory holds the (padded) context too
        if masked:
            images, context, _ = _etd_sample(config, 2)
            with torch.no_grad():
                memory, memory_mask = _Encode(mirror)(images, context)
            memory_axes = {0: "batch", 1: "memory"}
            add("encode", _Encode(mirror), (images, context), ["images", "context_ids"],
                ["image_embeds", "memory_mask"],
                {"images": batch, "context_ids": {0: "batch", 1: "context"}, "image_embeds": memory_axes,
                 "memory_mask": memory_axes})
        else:
            vision = _Vision(mirror)
            with torch.no_grad():
                memory = vision(images)
            add("vision", vision, (images,), ["images"], ["image_embeds"],
                {"images": batch, "image_embeds": batch})
        cross_in = [] if concat else (["image_embeds", "memory_mask"] if masked else ["image_embeds"])
        cross_args = () if concat else ((memory, memory_mask) if masked else (memory,))
        cross_axes = {} if concat else {n: memory_axes for n in cross_in}
        ids = torch.randint(4, 200, (2, 9))
        add("embed", _Embed(mirror), (ids,), ["input_ids"], ["inputs_embeds"],
            {"input_ids": {0: "batch", 1: "sequence"}, "inputs_embeds": {0: "batch", 1: "sequence"}})
        kv = [f"present.{i}.{part}" for i in range(depth) for part in ("key", "value")]
        past = [n.replace("present", "past") for n in kv]
        seq = {0: "batch", 2: "sequence"}
        embeds = mirror.decoder.token_embed(ids)
        prefill_in = ["inputs_embeds"] + cross_in
        prefill_args = (embeds, *cross_args)
        axes = {"inputs_embeds": {0: "batch", 1: "sequence"}, "logits": {0: "batch", 1: "sequence"},
                **{n: seq for n in kv}, **cross_axes}
        add("prefill", _Prefill(mirror), prefill_args, prefill_in, ["logits"] + kv, axes)
        with torch.no_grad():
            presents = _Prefill(mirror)(*prefill_args)[1:]
        step = torch.randint(4, 200, (2, 1))
        decode_in = ["input_ids"] + past + cross_in
        decode_args = (step, *presents, *cross_args)
        axes = {"input_ids": batch, "logits": batch, **{n: {0: "batch", 2: "past"} for n in past},
                **{n: {0: "batch", 2: "total"} for n in kv}, **cross_axes}
        add("decode", _Decode(mirror), decode_args, decode_in, ["logits"] + kv, axes)
    elif arch in ("two_tower", "two_leg"):
        ids = torch.randint(4, 60, (2, 9))
        text_axes = {"input_ids": {0: "batch", 1: "sequence"}}
        if arch == "two_tower":
            spec["logit_scale"] = float(mirror.logit_scale.exp().clamp(max=100))
            add("image_encoder", _TowerImage(mirror), (images,), ["images"], ["image_embeds"],
                {"images": batch, "image_embeds": batch})
            add("text_encoder", _TowerText(mirror), (ids,), ["input_ids"], ["text_embeds"],
                {**text_axes, "text_embeds": batch})
        else:
            add("image_encoder", _Pooled(mirror.image_encoder, True), (images,), ["images"], ["image_pooled"],
                {"images": batch, "image_pooled": batch})
            add("text_encoder", _Pooled(mirror.text_encoder, False), (ids,), ["input_ids"], ["text_pooled"],
                {**text_axes, "text_pooled": batch})
            add("model", _TwoLeg(mirror), (images, ids), ["images", "input_ids"], ["logits"],
                {"images": batch, **text_axes, "logits": batch})
    with open(os.path.join(directory, "export.json"), "w") as f:
        json.dump(spec, f, indent=2)
    return spec


__all__ = ["DEFAULT_OPSET", "onnx"]
