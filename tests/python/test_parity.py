"""Two-Tower forward against a tiny pure-PyTorch reference with copied weights.
The reference uses the same parameter names, so load_state_dict copies them."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import vlmkit
from conftest import batch, tiny_config


def rotate(x, positions, theta=10000.0):
    """Rotary embedding, rotate-half form: x [B, H, T, Dh], positions [B, T]."""
    half = x.shape[-1] // 2
    inv = 1.0 / theta ** (torch.arange(half, dtype=torch.float64) * 2 / x.shape[-1])
    angles = positions.double()[..., None] * inv
    cos, sin = angles.cos().float()[:, None], angles.sin().float()[:, None]
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


class Attention(nn.Module):
    def __init__(self, d, heads, context_dim=None, rotary=False):
        super().__init__()
        self.heads, self.rotary = heads, rotary
        c = context_dim or d
        self.q_proj, self.out_proj = nn.Linear(d, d), nn.Linear(d, d)
        self.k_proj, self.v_proj = nn.Linear(c, d), nn.Linear(c, d)

    def forward(self, x, pad=None, context=None, blocked=None, positions=None):
        b, t, d = x.shape
        src = x if context is None else context
        split = lambda y: y.view(b, -1, self.heads, d // self.heads).transpose(1, 2)
        q, k, v = split(self.q_proj(x)), split(self.k_proj(src)), split(self.v_proj(src))
        if self.rotary:
            q, k = rotate(q, positions), rotate(k, positions)
        scores = q @ k.transpose(-2, -1) / math.sqrt(d // self.heads)
        if pad is not None:
            scores = scores.masked_fill(pad[:, None, None, :], torch.finfo(scores.dtype).min)
        if blocked is not None:
            scores = scores.masked_fill(blocked, torch.finfo(scores.dtype).min)
        out = scores.softmax(-1) @ v
        return self.out_proj(out.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    def __init__(self, d, heads, cross=False, rotary=False):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.self_attn = Attention(d, heads, rotary=rotary)
        if cross:
            self.norm_cross, self.cross_attn = nn.LayerNorm(d), Attention(d, heads)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x, pad=None, context=None, causal=False, positions=None):
        blocked = None
        if causal:
            t = x.shape[1]
            blocked = torch.ones(t, t, dtype=torch.bool).triu(1)
        x = x + self.self_attn(self.norm1(x), pad, blocked=blocked, positions=positions)
        if hasattr(self, "cross_attn"):
            x = x + self.cross_attn(self.norm_cross(x), context=context)
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class ViT(nn.Module):
    def __init__(self, size, patch, d, depth, heads):
        super().__init__()
        grid = size // patch
        self.patch_embed = nn.Conv2d(3, d, patch, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.cls_pos = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid, d))
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(d)

    def forward(self, images):
        x = self.patch_embed(images).flatten(2).transpose(1, 2) + self.pos_embed
        x = torch.cat([(self.cls_token + self.cls_pos).expand(len(x), -1, -1), x], 1)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)  # [B, 1 + N, D]: CLS then patches


class TextEncoder(nn.Module):
    def __init__(self, vocab, max_len, d, depth, heads):
        super().__init__()
        self.token_embed = nn.Embedding(vocab, d)
        self.pos_embed = nn.Parameter(torch.zeros(1, max_len, d))
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(d)

    def forward(self, ids):
        pad = ids.eq(0)
        x = self.token_embed(ids) + self.pos_embed[:, : ids.shape[1]]
        for block in self.blocks:
            x = block(x, pad)
        x = self.norm(x)
        keep = (~pad).unsqueeze(-1).float()
        return (x * keep).sum(1) / keep.sum(1)


class TwoTowerReference(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        i, t = cfg["image_encoder"], cfg["text_encoder"]
        self.image_encoder = ViT(i["image_size"], i["patch_size"], i["d_model"], i["depth"], i["num_heads"])
        self.text_encoder = TextEncoder(t["vocab_size"], t["max_len"], t["d_model"], t["depth"], t["num_heads"])
        self.image_projection = nn.Linear(i["d_model"], cfg["embed_dim"], bias=False)
        self.text_projection = nn.Linear(t["d_model"], cfg["embed_dim"], bias=False)
        self.logit_scale = nn.Parameter(torch.zeros(()))

    def forward(self, images, ids):
        img = F.normalize(self.image_projection(self.image_encoder(images)[:, 0]), dim=-1)
        txt = F.normalize(self.text_projection(self.text_encoder(ids)), dim=-1)
        logits = self.logit_scale.exp().clamp(max=100) * img @ txt.t()
        labels = torch.arange(len(logits))
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2
        return img, txt, logits, loss


@pytest.mark.parametrize("depth", [1, 2])
def test_two_tower_matches_pure_pytorch_reference(depth):
    cfg = tiny_config("two_tower")
    cfg["image_encoder"]["depth"] = depth
    cfg["text_encoder"]["depth"] = depth
    model = vlmkit.TwoTower(cfg)
    ref = TwoTowerReference(model.config)
    ref.load_state_dict(model.state_dict(), strict=True)
    images, ids = batch(5)
    ids[:2, 4:] = 0  # padded texts
    out = model(images, ids)
    img, txt, logits, loss = ref(images, ids)
    torch.testing.assert_close(out.image_embeds, img, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.text_embeds, txt, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.logits_per_image, logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.loss, loss, rtol=1e-5, atol=1e-5)
    # Gradients agree too.
    out.loss.backward()
    loss.backward()
    grads = dict(model.named_parameters())
    for name, p in ref.named_parameters():
        torch.testing.assert_close(grads[name].grad, p.grad, rtol=1e-3, atol=1e-5, msg=name)


class EncoderDecoderReference(nn.Module):
    """ViT -> MLP projector -> concat at <image> or cross-attention -> rotary decoder."""

    def __init__(self, cfg):
        super().__init__()
        i, d = cfg["image_encoder"], cfg["decoder"]
        self.concat = cfg["fusion"] == "concat"
        self.image_encoder = ViT(i["image_size"], i["patch_size"], i["d_model"], i["depth"], i["num_heads"])
        self.projector = nn.Module()
        self.projector.fc1 = nn.Linear(i["d_model"], d["d_model"])
        self.projector.fc2 = nn.Linear(d["d_model"], d["d_model"])
        self.decoder = nn.Module()
        self.decoder.token_embed = nn.Embedding(d["vocab_size"], d["d_model"])
        self.decoder.blocks = nn.ModuleList(
            Block(d["d_model"], d["num_heads"], cross=not self.concat, rotary=True) for _ in range(d["depth"]))
        self.decoder.norm = nn.LayerNorm(d["d_model"])

    def forward(self, images, ids):
        memory = self.image_encoder(images)[:, 1:]
        memory = self.projector.fc2(F.gelu(self.projector.fc1(memory)))
        embeds = self.decoder.token_embed(ids)
        if self.concat:  # one <image> (id 3) per sample
            rows = []
            for b in range(len(ids)):
                at = int((ids[b] == 3).nonzero()[0])
                rows.append(torch.cat([embeds[b, :at], memory[b], embeds[b, at + 1:]]))
            x, context = torch.stack(rows), None
        else:
            x, context = embeds, memory
        positions = torch.arange(x.shape[1]).expand(len(x), -1)
        for block in self.decoder.blocks:
            x = block(x, context=context, causal=True, positions=positions)
        return self.decoder.norm(x) @ self.decoder.token_embed.weight.t()


@pytest.mark.parametrize("fusion", ["concat", "cross_attention"])
def test_encoder_decoder_matches_pure_pytorch_reference(fusion):
    cfg = {"architecture": "encoder_decoder", "fusion": fusion, "projector": {"type": "mlp"},
           "image_encoder": {"image_size": 32, "patch_size": 8, "d_model": 32, "depth": 1, "num_heads": 4},
           "decoder": {"d_model": 32, "depth": 2, "num_heads": 4, "max_len": 64}}
    model = vlmkit.EncoderDecoder(cfg)
    ref = EncoderDecoderReference(model.config)
    ref.load_state_dict(model.state_dict(), strict=True)
    images = torch.rand(2, 3, 32, 32)
    ids = torch.tensor([[1, 3, 40, 41, 42], [1, 50, 3, 51, 52]])
    logits = model(images, ids).logits
    expected = ref(images, ids)
    assert logits.shape == expected.shape
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("seed", [0, 1])
def test_whole_model_float32_gradients_match_float64(seed):
    """Every parameter's float32 gradient of `vlmkit train`'s model equals the float64
    one to a few 1e-6 of that parameter's largest gradient (2.5e-6 measured; the
    floor, 1% of the model's largest gradient, keeps analytically-zero gradients such
    as attention key biases out of the ratio). Catches a wrong float32 kernel such as
    LibTorch 1.13's GELU backward on transposed gradients (garbage or NaN)."""
    from vlmkit.bench import suite
    from vlmkit.train_vlm import SMALL_VLM
    torch.manual_seed(seed)
    model = vlmkit.build_model(SMALL_VLM).train()
    images, ids, labels = suite.batch_for(model.config, 4, 40, seed=seed)
    model(images, ids, None, labels).loss.backward()
    g32 = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.to(torch.float64)
    model(images.double(), ids, None, labels).loss.backward()
    top = max(p.grad.abs().max().item() for p in model.parameters())
    assert top > 0
    for name, p in model.named_parameters():
        scale = max(p.grad.abs().max().item(), 1e-2 * top)
        err = (g32[name].double() - p.grad).abs().max().item() / scale
        assert err < 2e-5, (name, err)
