"""The peer: what a user would write instead of vlmkit, in plain eager PyTorch.

It is also vlmkit's one pure-PyTorch reference: tests/python/test_parity.py checks
that, with vlmkit's weights copied in, it computes vlmkit's outputs, losses and
gradients for every architecture x registered projector x decoder fusion, and the
ONNX export (vlmkit.export) traces it. What it does not mirror, unmirrored() names,
and every user of it refuses such a configuration.

Same configurations as vlmkit (built from a vlmkit config dict, so the shapes and
parameter counts match — `check_parameter_counts` verifies it), the same
initialisation scheme (truncated normal 0.02 for weights, zero biases, unit
norms), torch.optim.AdamW, and a greedy generation loop with a KV cache. Attention
uses torch's fused scaled_dot_product_attention where the installed torch has it
(2.x), else the textbook matmul-softmax-matmul.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

_SDPA = getattr(F, "scaled_dot_product_attention", None)


def _init(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)
        elif isinstance(m, (nn.LayerNorm, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def rotary(x: torch.Tensor, positions: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
    """x [B, H, T, Dh], positions [T] -> rotated (half-split convention)."""
    dh = x.shape[-1]
    freqs = theta ** (-torch.arange(0, dh, 2, dtype=torch.float32, device=x.device) / dh)
    angles = positions.float()[:, None] * freqs[None]
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2 = x[..., : dh // 2], x[..., dh // 2:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1)


def repeat_heads(x: torch.Tensor, times: int) -> torch.Tensor:
    """[B, Hkv, S, Dh] -> [B, Hkv * times, S, Dh], head i reading key/value head i // times
    (repeat_interleave, written with expand so an ONNX trace keeps B and S dynamic)."""
    return x.unsqueeze(2).expand(-1, -1, times, -1, -1).flatten(1, 2)


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight (torch 1.13 has no nn.RMSNorm)."""

    def __init__(self, d: int, eps: float = 1e-5):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(d))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def make_norm(d: int, kind: str = "layernorm", eps: float = 1e-5) -> nn.Module:
    return RMSNorm(d, eps) if kind == "rmsnorm" else LayerNorm(d, eps=eps)


class Attention(nn.Module):
    def __init__(self, d: int, heads: int, context_dim: int = 0, rope: bool = False, theta: float = 10000.0,
                 kv_heads: int = 0, qk_norm: bool = False):
        super().__init__()
        c = context_dim or d
        self.h, self.rope, self.theta = heads, rope, theta
        self.kv = kv_heads or heads  # grouped-query attention: fewer key/value heads
        kv_dim = self.kv * (d // heads)
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(d, d), nn.Linear(c, kv_dim), nn.Linear(c, kv_dim)
        self.out_proj = nn.Linear(d, d)
        self.qk_norm = qk_norm
        if qk_norm:
            self.q_norm, self.k_norm = RMSNorm(d // heads, 1e-6), RMSNorm(d // heads, 1e-6)

    def forward(self, x, context=None, mask=None, causal=False, cache=None, positions=None):
        b, t, d = x.shape
        h, dh = self.h, d // self.h
        q = self.q_proj(x).view(b, t, h, dh).transpose(1, 2)
        if self.qk_norm:
            q = self.q_norm(q)
        src = x if context is None else context
        if cache is not None and context is not None and "k" in cache:
            k, v = cache["k"], cache["v"]  # cross-attention keys computed once
        else:
            k = self.k_proj(src).view(b, -1, self.kv, dh).transpose(1, 2)
            v = self.v_proj(src).view(b, -1, self.kv, dh).transpose(1, 2)
            if self.qk_norm:
                k = self.k_norm(k)
            if self.rope and context is None:
                q, k = rotary(q, positions, self.theta), rotary(k, positions, self.theta)
            if cache is not None:
                if context is None and "k" in cache:
                    k, v = torch.cat([cache["k"], k], 2), torch.cat([cache["v"], v], 2)
                cache["k"], cache["v"] = k, v
        if self.kv != h:
            k, v = repeat_heads(k, h // self.kv), repeat_heads(v, h // self.kv)
        if _SDPA is not None:
            out = _SDPA(q, k, v, attn_mask=None if mask is None else ~mask, is_causal=causal and mask is None)
        else:
            scores = q @ k.transpose(-2, -1) / math.sqrt(dh)
            if causal and mask is None:
                mask = torch.ones(t, k.shape[2], dtype=torch.bool, device=q.device).triu(k.shape[2] - t + 1)
            if mask is not None:
                scores = scores.masked_fill(mask, float("-inf"))
            out = scores.softmax(-1) @ v
        return self.out_proj(out.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    def __init__(self, d, heads, mlp_ratio=4.0, cross=False, context_dim=0, rope=False, theta=10000.0,
                 norm="layernorm", eps=1e-5, mlp="gelu", kv_heads=0, qk_norm=False):
        super().__init__()
        self.norm1 = make_norm(d, norm, eps)
        self.self_attn = Attention(d, heads, rope=rope, theta=theta, kv_heads=kv_heads, qk_norm=qk_norm)
        self.cross = cross
        if cross:
            self.norm_cross = make_norm(d, norm, eps)
            self.cross_attn = Attention(d, heads, context_dim, qk_norm=qk_norm)
        self.norm2 = make_norm(d, norm, eps)
        hidden = round(d * mlp_ratio)
        self.swiglu = mlp == "swiglu"
        if self.swiglu:  # bias-free, as Llama
            self.gate_proj, self.up_proj = nn.Linear(d, hidden, bias=False), nn.Linear(d, hidden, bias=False)
            self.down_proj = nn.Linear(hidden, d, bias=False)
        else:
            self.fc1, self.fc2 = nn.Linear(d, hidden), nn.Linear(hidden, d)

    def mlp(self, x):
        if self.swiglu:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return self.fc2(F.gelu(self.fc1(x)))

    def forward(self, x, mask=None, causal=False, context=None, cache=None, positions=None):
        x = x + self.self_attn(self.norm1(x), mask=mask, causal=causal,
                               cache=None if cache is None else cache.setdefault("self", {}), positions=positions)
        if self.cross:
            x = x + self.cross_attn(self.norm_cross(x), context,
                                    cache=None if cache is None else cache.setdefault("cross", {}))
        return x + self.mlp(self.norm2(x))


class _InWeightPrecision:
    """Torch 1.13's CPU autocast leaves layer_norm and group_norm out: bf16
    activations beside float32 weights are normalised in float32, as vlmkit does."""

    def forward(self, x):
        return super().forward(x.to(self.weight.dtype) if x.dtype != self.weight.dtype else x)


class LayerNorm(_InWeightPrecision, nn.LayerNorm):
    pass


class GroupNorm(_InWeightPrecision, nn.GroupNorm):
    pass


class ConvStem(nn.Module):
    def __init__(self, channels: List[int], d: int, in_ch: int = 3):
        super().__init__()
        layers = []
        for c in channels:
            layers += [nn.Conv2d(in_ch, c, 3, 2, 1, bias=False), GroupNorm(math.gcd(8, c), c), nn.GELU()]
            in_ch = c
        self.stages = nn.Sequential(*layers)
        self.proj, self.norm = nn.Conv2d(in_ch, d, 1), LayerNorm(d)

    def forward(self, images):
        f = self.proj(self.stages(images))
        return self.norm(f.flatten(2).transpose(1, 2)), (f.shape[2], f.shape[3])


class ViT(nn.Module):
    def __init__(self, c: Dict):
        super().__init__()
        d, p = c["d_model"], c["patch_size"]
        grid = c["image_size"] // p
        if c.get("stem", "patch") == "patch":
            self.patch_embed = nn.Conv2d(c.get("in_channels", 3), d, p, p)
        else:
            stages = int(math.log2(p))  # vlmkit: log2(p) stride-2 stages widening to d
            self.conv_stem = ConvStem([max(8, d >> (stages - 1 - i)) for i in range(stages)], d)
        self.cls = c.get("pool", "cls") == "cls"
        if self.cls:
            self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
            self.cls_pos = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.randn(1, grid * grid, d) * 0.02)
        norm, mlp = c.get("norm", "layernorm"), c.get("mlp", "gelu")
        self.blocks = nn.ModuleList(Block(d, c["num_heads"], c.get("mlp_ratio", 4.0), norm=norm, mlp=mlp)
                                    for _ in range(c["depth"]))
        self.norm = make_norm(d, norm)
        self.map = c.get("pool") == "map"
        if self.map:  # SigLIP's attention-pooling head
            hidden = round(d * c.get("mlp_ratio", 4.0))
            self.pool_probe = nn.Parameter(torch.randn(1, 1, d) * 0.02)
            self.pool_attn = Attention(d, c["num_heads"], d)
            self.pool_norm = make_norm(d, norm)
            self.pool_fc1, self.pool_fc2 = nn.Linear(d, hidden), nn.Linear(hidden, d)

    def forward(self, images):
        if hasattr(self, "patch_embed"):
            f = self.patch_embed(images)
            x, grid = f.flatten(2).transpose(1, 2), (f.shape[2], f.shape[3])
        else:
            x, grid = self.conv_stem(images)
        x = x + self.pos_embed
        if self.cls:
            x = torch.cat([(self.cls_token + self.cls_pos).expand(x.shape[0], -1, -1), x], 1)
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        if self.cls:
            return x[:, 1:], x[:, 0], grid
        if self.map:
            probe = self.pool_attn(self.pool_probe.expand(x.shape[0], -1, -1), x)
            probe = probe + self.pool_fc2(F.gelu(self.pool_fc1(self.pool_norm(probe))))
            return x, probe[:, 0], grid
        return x, x.mean(1), grid


class TextEncoder(nn.Module):
    def __init__(self, c: Dict):
        super().__init__()
        d = c["d_model"]
        self.pad, self.pool = c.get("pad_id", 0), c.get("pool", "mean")
        self.token_embed = nn.Embedding(c["vocab_size"], d)
        self.pos_embed = nn.Parameter(torch.randn(1, c["max_len"], d) * 0.02)
        norm, mlp = c.get("norm", "layernorm"), c.get("mlp", "gelu")
        self.blocks = nn.ModuleList(Block(d, c["num_heads"], c.get("mlp_ratio", 4.0), norm=norm, mlp=mlp)
                                    for _ in range(c["depth"]))
        self.norm = make_norm(d, norm)

    def forward(self, ids):
        pad = ids.eq(self.pad)
        x = self.token_embed(ids) + self.pos_embed[:, : ids.shape[1]]
        mask = pad[:, None, None, :]
        for block in self.blocks:
            x = block(x, mask=mask)
        x = self.norm(x)
        keep = (~pad).unsqueeze(-1).float()
        return (x * keep).sum(1) / keep.sum(1).clamp_min(1)


def space_to_depth(x, grid, r):
    b, _, d = x.shape
    return x.reshape(b, grid[0] // r, r, grid[1] // r, r, d).permute(0, 1, 3, 2, 4, 5).reshape(b, -1, r * r * d)


class LinearProjector(nn.Module):
    def __init__(self, c: Dict, in_dim: int, out_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, out_dim)

    def forward(self, tokens, grid):
        return self.fc1(tokens)

    def out_grid(self, grid):
        return grid


class MlpProjector(nn.Module):
    def __init__(self, c: Dict, in_dim: int, out_dim: int):
        super().__init__()
        hidden = c.get("hidden_dim", 0) or out_dim
        self.fc1, self.fc2 = nn.Linear(in_dim, hidden), nn.Linear(hidden, out_dim)

    def forward(self, tokens, grid):
        return self.fc2(F.gelu(self.fc1(tokens)))

    def out_grid(self, grid):
        return grid


class PixelShuffleProjector(nn.Module):
    def __init__(self, c: Dict, in_dim: int, out_dim: int):
        super().__init__()
        self.r = c.get("factor", 2)
        self.proj = nn.Linear(in_dim * self.r ** 2, out_dim)

    def forward(self, tokens, grid):
        return self.proj(space_to_depth(tokens, grid, self.r))

    def out_grid(self, grid):
        return grid[0] // self.r, grid[1] // self.r


class PatchMergerProjector(nn.Module):
    def __init__(self, c: Dict, in_dim: int, out_dim: int):
        super().__init__()
        self.norm, self.fc1, self.fc2 = LayerNorm(in_dim), nn.Linear(4 * in_dim, 4 * in_dim), \
            nn.Linear(4 * in_dim, out_dim)

    def forward(self, tokens, grid):
        return self.fc2(F.gelu(self.fc1(space_to_depth(self.norm(tokens), grid, 2))))

    def out_grid(self, grid):
        return grid[0] // 2, grid[1] // 2


class ResamplerProjector(nn.Module):
    def __init__(self, c: Dict, in_dim: int, out_dim: int):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(1, c.get("num_queries", 16), out_dim) * 0.02)
        self.blocks = nn.ModuleList(Block(out_dim, c.get("num_heads", 4), cross=True, context_dim=in_dim)
                                    for _ in range(c.get("num_layers", 1)))
        self.norm = LayerNorm(out_dim)

    def forward(self, tokens, grid):
        x = self.queries.expand(tokens.shape[0], -1, -1)
        for block in self.blocks:
            x = block(x, context=tokens)
        return self.norm(x)

    def out_grid(self, grid):
        return None  # learned queries lie on no grid


#: The plain-PyTorch mirror of each registered projector, by config name. A
#: projector registered in C++ without a mirror here is refused by unmirrored().
PROJECTORS = {"linear": LinearProjector, "mlp": MlpProjector, "pixel_shuffle": PixelShuffleProjector,
              "patch_merger": PatchMergerProjector, "resampler": ResamplerProjector}


def Projector(c: Dict, in_dim: int, out_dim: int) -> nn.Module:
    kind = c.get("type", "mlp")
    if kind not in PROJECTORS:
        raise NotImplementedError(f"no plain-PyTorch mirror of projector {kind!r} (have {sorted(PROJECTORS)})")
    return PROJECTORS[kind](c, in_dim, out_dim)


class Decoder(nn.Module):
    def __init__(self, c: Dict, context_dim: int):
        super().__init__()
        d, every = c["d_model"], c.get("cross_attention_every", 0)
        self.token_embed = nn.Embedding(c["vocab_size"], d)
        self.blocks = nn.ModuleList(Block(d, c["num_heads"], c.get("mlp_ratio", 4.0), cross=every > 0 and (i + 1) % every == 0,
                                          context_dim=context_dim, rope=True, theta=c.get("rope_theta", 10000.0),
                                          norm=c.get("norm", "layernorm"), eps=c.get("norm_eps", 1e-5),
                                          mlp=c.get("mlp", "gelu"), kv_heads=c.get("num_kv_heads", 0),
                                          qk_norm=c.get("qk_norm", False))
                                    for i in range(c["depth"]))
        self.norm = make_norm(d, c.get("norm", "layernorm"), c.get("norm_eps", 1e-5))

    def forward(self, x, mask=None, causal=True, context=None, caches=None, start=0, last_only=False):
        positions = torch.arange(start, start + x.shape[1], device=x.device)
        for i, block in enumerate(self.blocks):
            x = block(x, mask=mask, causal=causal, context=context,
                      cache=None if caches is None else caches[i], positions=positions)
        if last_only:  # generation reads only the last position's logits (so does vlmkit)
            x = x[:, -1:]
        return self.norm(x) @ self.token_embed.weight.t()


def prefix_lm_mask(t: int, prefix: torch.Tensor) -> torch.Tensor:
    """[B, 1, T, T], True where attention is cut: the future, except keys inside
    each row's prefix (positions < prefix[b] attend both ways)."""
    causal = torch.ones(t, t, dtype=torch.bool, device=prefix.device).triu(1)
    return (causal[None] & (torch.arange(t, device=prefix.device)[None, None, :] >= prefix[:, None, None]))[:, None]


class EncoderDecoder(nn.Module):
    """Architecture 4 (LLaVA-style concat at <image>, or Flamingo-style cross-attention)."""

    def __init__(self, c: Dict):
        super().__init__()
        dec = dict(c["decoder"])
        self.concat = c.get("fusion", "concat") == "concat"
        self.prefix_lm = c.get("attention", "causal") == "prefix_lm"
        self.reduction = c.get("loss_reduction", "token")
        self.image_token = c.get("image_token_id", 3)
        self.image_positions = c.get("image_positions", "none")
        if self.image_positions == "gated_sincos2d":  # registered first, as vlmkit's own parameter
            self.image_position_gate = nn.Parameter(torch.zeros(dec["d_model"]))
        self.image_encoder = ViT(c["image_encoder"])
        self.projector = Projector(c["projector"], c["image_encoder"]["d_model"], dec["d_model"])
        self.decoder = Decoder(dec, dec.get("context_dim", 0) or dec["d_model"])
        _init(self)

    def encode_images(self, images):
        """images -> projected tokens, with the projector grid's sine-cosine
        positions under image_positions "sincos2d" (as vlmkit adds them)."""
        tokens, _, grid = self.image_encoder(images)
        memory = self.projector(tokens, grid)
        if self.image_positions in ("sincos2d", "gated_sincos2d"):
            rows, cols = self.projector.out_grid(grid)
            table = sincos_2d(rows, cols, memory.shape[-1], memory.device)
            if self.image_positions == "gated_sincos2d":
                table = table * self.image_position_gate
            memory = memory + table.to(memory.dtype)
        return memory

    def fuse(self, images, ids):
        memory = self.encode_images(images)
        embeds = self.decoder.token_embed(ids)
        if not self.concat:  # the prompt is the prefix (prefix-LM decides its length from the labels)
            return embeds, memory, torch.zeros(len(ids), dtype=torch.long, device=ids.device)
        # Each row's <image> placeholder is replaced by the image tokens.
        pos = ids.eq(self.image_token).float().argmax(1)
        rows = [torch.cat([embeds[b, :p], memory[b], embeds[b, p + 1:]]) for b, p in enumerate(pos.tolist())]
        return torch.stack(rows), None, pos + memory.shape[1]

    def forward(self, images, ids, labels=None):
        x, context, prefix = self.fuse(images, ids)
        if labels is not None and self.concat:
            m = x.shape[1] - ids.shape[1]
            pos = ids.eq(self.image_token).float().argmax(1)
            full = torch.full(x.shape[:2], -100, dtype=torch.long, device=labels.device)
            for b, p in enumerate(pos.tolist()):
                full[b, :p] = labels[b, :p]
                full[b, p + m + 1:] = labels[b, p + 1:]
            labels = full
        mask = None
        if self.prefix_lm and prefix is not None:
            # Prefix-LM: image and prompt (everything before the first labelled
            # position; the whole sequence without labels) attend both ways.
            t = x.shape[1]
            if labels is not None:
                labelled = labels.ne(-100)
                prefix = torch.where(labelled.any(1), labelled.float().argmax(1), torch.full_like(prefix, t))
            else:
                prefix = torch.full_like(prefix, t)
            mask = prefix_lm_mask(t, prefix)
        logits = self.decoder(x, mask=mask, causal=mask is None, context=context)
        if labels is None:
            return logits, None
        pred, target = logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1)
        if self.reduction == "token":
            return logits, F.cross_entropy(pred, target, ignore_index=-100)
        # Per sample: mean over its labelled tokens, then mean over samples that have any;
        # sqrt: each sample's sum over the square root of its count, over the sum of those roots.
        per_token = F.cross_entropy(pred, target, ignore_index=-100, reduction="none").view(len(labels), -1)
        valid = labels[:, 1:].ne(-100).to(per_token.dtype)
        count = valid.sum(1)
        if self.reduction == "sqrt":
            root = count.sqrt()
            return logits, ((per_token * valid).sum(1) / root.clamp(min=1)).sum() / root.sum()
        has = count.gt(0).to(per_token.dtype)
        loss = ((per_token * valid).sum(1) / count.clamp(min=1) * has).sum() / has.sum()
        return logits, loss

    @torch.no_grad()
    def generate(self, images, ids, max_new_tokens: int, use_cache: bool = True, eos: int = 2) -> List[List[int]]:
        """Greedy decoding of equal-length prompts, with or without a KV cache."""
        x, context, _ = self.fuse(images, ids)
        out = [[] for _ in range(len(ids))]
        prompt = torch.full((len(ids),), x.shape[1], dtype=torch.long, device=ids.device)
        if use_cache:
            caches = [{} for _ in self.decoder.blocks]
            # Prefix-LM: the whole prompt attends both ways; generated tokens causally.
            logits = self.decoder(x, causal=not self.prefix_lm, context=context, caches=caches, last_only=True)
            length = x.shape[1]
            for step in range(max_new_tokens):
                nxt = logits[:, -1].argmax(-1)
                for b, t in enumerate(nxt.tolist()):
                    out[b].append(t)
                if step + 1 == max_new_tokens:
                    break  # the budget is spent: no pass for a token nobody reads (as vlmkit)
                logits = self.decoder(self.decoder.token_embed(nxt[:, None]), causal=False, context=context,
                                      caches=caches, start=length)
                length += 1
        else:
            for _ in range(max_new_tokens):
                mask = prefix_lm_mask(x.shape[1], prompt) if self.prefix_lm else None
                nxt = self.decoder(x, mask=mask, causal=mask is None, context=context, last_only=True)[:, -1].argmax(-1)
                for b, t in enumerate(nxt.tolist()):
                    out[b].append(t)
                x = torch.cat([x, self.decoder.token_embed(nxt[:, None])], 1)
        return out


class TwoTower(nn.Module):
    def __init__(self, c: Dict):
        super().__init__()
        self.image_encoder, self.text_encoder = ViT(c["image_encoder"]), TextEncoder(c["text_encoder"])
        e = c.get("embed_dim", 128)
        self.image_proj = nn.Linear(c["image_encoder"]["d_model"], e, bias=False)
        self.text_proj = nn.Linear(c["text_encoder"]["d_model"], e, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(c.get("logit_scale_init", math.log(1 / 0.07))))
        self.max_scale = c.get("max_logit_scale", 100.0)
        self.siglip = c.get("loss") == "siglip"
        if self.siglip:
            self.logit_bias = nn.Parameter(torch.tensor(c.get("logit_bias_init", -10.0)))
        _init(self)

    def forward(self, images, ids, labels=None):
        i = F.normalize(self.image_proj(self.image_encoder(images)[1]), dim=-1)
        t = F.normalize(self.text_proj(self.text_encoder(ids)), dim=-1)
        logits = self.logit_scale.exp().clamp(max=self.max_scale) * i @ t.t()
        if self.siglip:  # sigmoid loss over every pair (Zhai et al. 2023), +1 on the diagonal
            logits = logits + self.logit_bias
            signs = 2 * torch.eye(len(i), dtype=logits.dtype, device=logits.device) - 1
            return logits, -F.logsigmoid(signs * logits).sum() / len(i)
        target = torch.arange(len(i), device=logits.device)
        return logits, (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2


class TwoLeg(nn.Module):
    def __init__(self, c: Dict):
        super().__init__()
        self.image_encoder, self.text_encoder = ViT(c["image_encoder"]), TextEncoder(c["text_encoder"])
        f, h = c["fusion"], c["head"]
        di, dt = c["image_encoder"]["d_model"], c["text_encoder"]["d_model"]
        dim = f.get("dim", 256)
        hidden = f.get("hidden_dim", 0) or dim
        self.fusion = nn.Sequential(nn.Linear(di + dt, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.head = nn.Linear(dim, h.get("num_classes", 16))
        _init(self)

    def forward(self, images, ids, labels=None):
        joint = torch.cat([self.image_encoder(images)[1], self.text_encoder(ids)], -1)
        logits = self.head(self.fusion(joint))
        return logits, None if labels is None else F.cross_entropy(logits, labels)


def sincos_2d(rows: int, cols: int, dim: int, device=None) -> torch.Tensor:
    """vlmkit's fixed 2D positions [rows * cols, dim]: sin/cos of the row, then of the column."""
    quarter = dim // 4
    omega = 1.0 / 10000.0 ** (torch.arange(quarter, dtype=torch.float64, device=device) / quarter)
    # Row-major (row, col) of every cell, written with expand so an ONNX trace keeps the grid dynamic.
    ys = torch.arange(rows, dtype=torch.float64, device=device)[:, None].expand(rows, cols).reshape(-1)
    xs = torch.arange(cols, dtype=torch.float64, device=device)[None, :].expand(rows, cols).reshape(-1)
    # Angles in float64 as vlmkit does; sin and cos in float32 (ONNX Runtime has no float64 Sin/Cos).
    oy, ox = torch.outer(ys, omega).float(), torch.outer(xs, omega).float()
    return torch.cat([oy.sin(), oy.cos(), ox.sin(), ox.cos()], 1)


class EncoderTextDecoder(nn.Module):
    """Architecture 3: image tokens and a context text encoded together by the text
    encoder's blocks, projected into a memory that the decoder reads (concat at
    <image> or cross-attention). The mirror covers the forward pass (logits) and
    the export; it is not timed by the suite."""

    def __init__(self, c: Dict):
        super().__init__()
        image, text, dec = c["image_encoder"], c["text_encoder"], dict(c["decoder"])
        self.concat = c.get("fusion", "concat") == "concat"
        self.prefix_lm = c.get("attention", "causal") == "prefix_lm"
        self.image_token = c.get("image_token_id", 3)
        di, dt = image["d_model"], text["d_model"]
        self.modality_embed = nn.Parameter(torch.randn(2, dt) * 0.02)  # own parameters come first, as in C++
        if image.get("type", "vit") == "conv":
            self.image_encoder = ConvStem(image["channels"], di, image.get("in_channels", 3))
        else:
            self.image_encoder = ViT(image)
        self.text_encoder = TextEncoder(text)
        if di != dt:
            self.image_to_text = nn.Linear(di, dt)
        self.projector = Projector(c["projector"], dt, dec["d_model"])
        self.context_projection = nn.Linear(dt, dec["d_model"])
        self.decoder = Decoder(dec, dec.get("context_dim", 0) or dec["d_model"])
        _init(self)

    def encode(self, images, context_ids):
        """memory [B, M + C, D] and its padding mask [B, M + C] (true = padding)."""
        out = self.image_encoder(images)
        tokens, grid = (out[0], out[2]) if len(out) == 3 else out
        img = self.image_to_text(tokens) if hasattr(self, "image_to_text") else tokens
        d = img.shape[-1]
        if grid[0] * grid[1] == img.shape[1] and d % 4 == 0:
            img = img + sincos_2d(grid[0], grid[1], d, img.device)
        img = img + self.modality_embed[0]
        te = self.text_encoder
        txt = te.token_embed(context_ids) + te.pos_embed[:, : context_ids.shape[1]] + self.modality_embed[1]
        pad = context_ids.eq(te.pad)
        joint_pad = torch.cat([torch.zeros_like(img[:, :, 0], dtype=torch.bool), pad], 1)
        x = torch.cat([img, txt], 1)
        for block in te.blocks:
            x = block(x, mask=joint_pad[:, None, None, :])
        x = te.norm(x)
        n = img.shape[1]
        projected = self.projector(x[:, :n], grid)
        memory = torch.cat([projected, self.context_projection(x[:, n:])], 1)
        mask = torch.cat([torch.zeros_like(projected[:, :, 0], dtype=torch.bool), pad], 1)
        return memory, mask

    def forward(self, images, context_ids, ids, labels=None):
        if labels is not None:
            raise NotImplementedError("the encoder_text_decoder mirror computes logits only")
        memory, mask = self.encode(images, context_ids)
        embeds = self.decoder.token_embed(ids)
        if self.concat:  # each row's <image> becomes its valid memory tokens
            rows = []
            for b, p in enumerate(ids.eq(self.image_token).float().argmax(1).tolist()):
                rows.append(torch.cat([embeds[b, :p], memory[b][~mask[b]], embeds[b, p + 1:]]))
            if len({len(r) for r in rows}) != 1:
                raise NotImplementedError("the mirror needs equal fused lengths per batch")
            x, context, context_mask = torch.stack(rows), None, None
        else:
            x, context, context_mask = embeds, memory, mask
        t = x.shape[1]
        attn = None if self.prefix_lm else torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1)
        positions = torch.arange(t, device=x.device)
        for block in self.decoder.blocks:
            x = x + block.self_attn(block.norm1(x), mask=attn, positions=positions)
            if block.cross:
                x = x + block.cross_attn(block.norm_cross(x), context,
                                         mask=None if context_mask is None else context_mask[:, None, None, :])
            x = x + block.mlp(block.norm2(x))
        return self.decoder.norm(x) @ self.decoder.token_embed.weight.t(), None


PEERS = {"encoder_decoder": EncoderDecoder, "two_tower": TwoTower, "two_leg": TwoLeg}
# The export also traces this one (the suite does not time it).
MIRRORS = {**PEERS, "encoder_text_decoder": EncoderTextDecoder}


def unmirrored(config: Dict) -> List[str]:
    """The settings of a (complete) vlmkit config that the peer does not
    implement; build_peer refuses such configs rather than time other work."""
    arch, out = config["architecture"], []
    image = config.get("image_encoder", {})
    if image.get("type", "vit") != "vit" and arch != "encoder_text_decoder":
        out.append(f"image encoder {image.get('type')!r} (the peer has the ViT)")
    for key, default in (("pos_embedding", "learned"), ("norm_eps", 1e-5)):
        if key in image and image[key] != default:
            out.append(f"image_encoder {key} {image[key]!r}")
    text = config.get("text_encoder", {})
    if text.get("pool", "mean") != "mean":
        out.append(f"text_encoder pool {text['pool']!r} (the peer mean-pools)")
    decoder = config.get("decoder", {})
    if decoder.get("pos_embedding", "rotary") != "rotary":
        out.append(f"decoder pos_embedding {decoder['pos_embedding']!r} (the peer has rotary)")
    if not decoder.get("tie_embeddings", True):
        out.append("untied decoder embeddings")
    if arch == "two_leg":
        if config["fusion"].get("type") != "concat_mlp":
            out.append(f"fusion {config['fusion'].get('type')!r} (the peer has concat_mlp)")
        if config["head"].get("type", "classification") != "classification":
            out.append(f"head {config['head'].get('type')!r} (the peer has a classification head)")
    if arch in ("encoder_decoder", "encoder_text_decoder"):
        kind = config.get("projector", {}).get("type", "mlp")
        if kind not in PROJECTORS:
            out.append(f"projector {kind!r} (the peer has {', '.join(sorted(PROJECTORS))})")
        if config.get("label_smoothing", 0.0):
            out.append("label_smoothing")
        if config["decoder"].get("gated_cross_attention"):
            out.append("gated_cross_attention")
    return out


def build_peer(config: Dict) -> nn.Module:
    arch = config["architecture"]
    if arch not in PEERS:
        raise ValueError(f"no PyTorch peer for {arch!r} (have {sorted(PEERS)})")
    missing = unmirrored(config)
    if missing:
        raise ValueError(f"the PyTorch peer does not implement {', '.join(missing)}")
    return PEERS[arch](config)


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
