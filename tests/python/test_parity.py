"""Two-Tower forward against a tiny pure-PyTorch reference with copied weights.
The reference uses the same parameter names, so load_state_dict copies them."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import vlmkit
from conftest import batch, tiny_config


class Attention(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x, pad=None):
        b, t, d = x.shape
        split = lambda y: y.view(b, -1, self.heads, d // self.heads).transpose(1, 2)
        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        scores = q @ k.transpose(-2, -1) / math.sqrt(d // self.heads)
        if pad is not None:
            scores = scores.masked_fill(pad[:, None, None, :], torch.finfo(scores.dtype).min)
        out = scores.softmax(-1) @ v
        return self.out_proj(out.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.self_attn = Attention(d, heads)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x, pad=None):
        x = x + self.self_attn(self.norm1(x), pad)
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
        return self.norm(x)[:, 0]


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
        img = F.normalize(self.image_projection(self.image_encoder(images)), dim=-1)
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
