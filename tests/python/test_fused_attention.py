"""The fused CPU attention kernel (vlmkit.fused_attention; kernels/attention.h):
float64 gradcheck, float32 and bfloat16 parity with ATen's matmul-softmax-matmul
under the masks the models build (none, causal, packed rows with padding, rows
with every key blocked), and whole models giving ATen's loss and gradients with
it (every architecture x projector x fusion, packed rows). Also the fused rotary
positions (vlmkit.rotary), which the same setting picks."""
import itertools
import math

import pytest
import torch

import vlmkit

from test_generative import ARCHS, FUSIONS, PROJECTORS, tiny
from test_packing import losses_and_grads


def reference(q, k, v, bias, scale=None):
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = (q * scale) @ k.transpose(-2, -1)
    if bias is not None:
        scores = scores + bias
    return scores.softmax(-1) @ v


def blocked(allowed, dtype):
    """Additive bias [B, 1, T, S] from a bool 'may attend' [B, T, S], as the models build it."""
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


def packed_bias(batch, t, dtype, seed=0, padding=True):
    """Causal attention inside 3-4 examples per row, nothing across them, and (padding) 5
    padding positions at the end that see nothing (rows whose every key is blocked)."""
    g = torch.Generator().manual_seed(seed)
    seg = torch.zeros(batch, t, dtype=torch.long)
    for b in range(batch):
        for cut in sorted(torch.randint(1, t - 5, (3,), generator=g).tolist()):
            seg[b, cut:] += 1
        if padding:
            seg[b, t - 5:] = -1
    allowed = (seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] >= 0) & torch.ones(t, t, dtype=torch.bool).tril()
    return blocked(allowed, dtype)


def causal_bias(t, s, dtype):
    return blocked(torch.ones(t, s, dtype=torch.bool).tril(s - t)[None], dtype)


MASKS = ["none", "causal", "packed"]


def make(mask, b, h, t, s, d, dtype, seed=0, padding=True):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, n, d, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
               for n in (t, s, s))
    bias = None if mask == "none" else causal_bias(t, s, dtype) if mask == "causal" else packed_bias(b, t, dtype, seed, padding)
    return q, k, v, bias


@pytest.mark.parametrize("mask", MASKS)
def test_float64_gradcheck(mask):
    # 70 keys: two key tiles, the second partial; 20 queries: two query tiles.
    # No padding rows: a row whose every key is blocked has scores of exactly the fill
    # value, which absorbs a finite difference, so gradcheck's numerical side reads 0
    # there for ATen too (the test below compares those rows with ATen instead).
    t, s = (70, 70) if mask == "packed" else (20, 70)
    q, k, v, bias = make(mask, 2, 2, t, s, 4, torch.float64, padding=False)
    assert torch.autograd.gradcheck(lambda a, b_, c: vlmkit.fused_attention(a, b_, c, bias), (q, k, v))


@pytest.mark.parametrize("mask,d", itertools.product(MASKS, [8, 32, 64]))
def test_float32_equals_aten(mask, d):
    t = 150
    q, k, v, bias = make(mask, 2, 3, t, t, d, torch.float32)
    out = vlmkit.fused_attention(q, k, v, bias)
    ref = reference(q, k, v, bias)
    assert out.shape == ref.shape == (2, 3, t, d)
    assert (out - ref).abs().max() < 1e-5
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(ref, (q, k, v), grad)
    for name, a, b in zip("qkv", got, want):
        assert (a - b).abs().max() <= 1e-5 * max(1.0, b.abs().max().item()), name


def test_rows_with_every_key_blocked_get_uniform_weights_as_in_aten():
    q, k, v, _ = make("none", 1, 2, 20, 40, 8, torch.float64)
    allowed = torch.ones(1, 20, 40, dtype=torch.bool)
    allowed[:, 3] = False      # one row sees nothing
    allowed[:, :, 30:] = False  # and no row sees the last keys
    bias = blocked(allowed, torch.float64)
    out = vlmkit.fused_attention(q, k, v, bias)
    assert torch.allclose(out[0, :, 3], v[0].mean(1), atol=1e-12)
    assert torch.allclose(out, reference(q, k, v, bias), atol=1e-12)
    grad = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), grad),
                    torch.autograd.grad(reference(q, k, v, bias), (q, k, v), grad)):
        assert torch.allclose(a, b, atol=1e-12)


def test_bfloat16_is_computed_in_float32():
    q, k, v, bias = make("packed", 2, 2, 100, 100, 32, torch.bfloat16)
    out = vlmkit.fused_attention(q, k, v, bias)
    assert out.dtype == torch.bfloat16
    exact = reference(*(x.detach().double() for x in (q, k, v)), bias.double())
    # Within bfloat16's rounding of the result (2^-8 relative), unlike a bf16 softmax chain.
    assert (out.double() - exact).abs().max() < 2e-2
    out.float().sum().backward()
    assert all(x.grad is not None and x.grad.dtype == torch.bfloat16 for x in (q, k, v))


def test_strided_inputs_and_a_broadcast_bias():
    # q as MultiheadAttention makes it: [B, T, H, Dh] viewed as [B, H, T, Dh].
    q = torch.randn(2, 80, 4, 16).transpose(1, 2)
    k = torch.randn(2, 80, 4, 16).transpose(1, 2)
    v = torch.randn(2, 4, 80, 16)
    bias = causal_bias(80, 80, torch.float32)
    assert torch.allclose(vlmkit.fused_attention(q, k, v, bias), reference(q, k, v, bias), atol=1e-5)
    assert torch.allclose(vlmkit.fused_attention(q, k, v, None, 0.5), reference(q, k, v, None, 0.5), atol=1e-5)


def test_bad_inputs_are_refused_by_name():
    q, k, v, bias = make("causal", 1, 2, 16, 16, 8, torch.float32)
    with pytest.raises(ValueError, match=r"\[B \| 1, 1, T, S\]"):
        vlmkit.fused_attention(q, k, v, bias[:, :, :8])
    with pytest.raises(ValueError, match="different dtypes"):
        vlmkit.fused_attention(q, k.double(), v, None)
    with pytest.raises(ValueError, match="do not match"):
        vlmkit.fused_attention(q, k[:, :1], v[:, :1], None)
    with pytest.raises(ValueError, match="4-D"):
        vlmkit.fused_attention(q[0], k[0], v[0], None)
    with pytest.raises(ValueError, match="needs a gradient"):
        vlmkit.fused_attention(q, k, v, bias.clone().requires_grad_())
    with pytest.raises(ValueError, match="auto"):
        vlmkit.set_attention_kernel("flash")
    out = vlmkit.fused_attention(q, k, v, bias)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(out.sum(), q, create_graph=True)


@pytest.fixture
def kernel():
    before = vlmkit.attention_kernel()
    yield vlmkit.set_attention_kernel
    vlmkit.set_attention_kernel(before)


@pytest.mark.parametrize("arch,projector,fusion", list(itertools.product(ARCHS, PROJECTORS, FUSIONS)))
def test_models_train_with_the_fused_kernel_as_with_aten(kernel, arch, projector, fusion):
    """Packed rows (causal and prefix-LM blocks, padding), float64: the fused kernel gives
    ATen's loss and gradients for every parameter."""
    config = tiny(arch, projector, fusion, attention="prefix_lm", loss_reduction="sample")
    config["decoder"]["max_len"] = 320
    torch.manual_seed(0)
    model = vlmkit.build_model(config).double()
    kernel("aten")
    loss, grads = losses_and_grads(model, arch, packed=True)
    kernel("fused")
    fused_loss, fused_grads = losses_and_grads(model, arch, packed=True)
    assert abs(fused_loss - loss) < 1e-9
    for name, grad in grads.items():
        assert torch.allclose(fused_grads[name], grad, atol=1e-9, rtol=1e-7), name


# --- rotary positions ---------------------------------------------------------------

def rotary_table(b, t, dh, dtype=torch.float32, theta=10000.0, offset=0):
    pos = torch.arange(t, dtype=torch.float64)[None].expand(b, t) + offset + torch.arange(b)[:, None]
    inv = 1.0 / theta ** (torch.arange(0, dh // 2, dtype=torch.float64) * 2 / dh)
    ang = pos[..., None] * inv
    return ang.cos().to(dtype).contiguous(), ang.sin().to(dtype).contiguous()


def rotary_reference(x, cos, sin):
    half = x.shape[-1] // 2
    c, s = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], -1)


def heads_view(b, t, h, dh, dtype=torch.float32):
    """q as attention has it: [B, T, H, Dh] viewed as [B, H, T, Dh]."""
    return torch.randn(b, t, h, dh, dtype=dtype).transpose(1, 2).requires_grad_()


def test_rotary_float64_gradcheck():
    x = heads_view(2, 5, 3, 8, torch.float64)
    cos, sin = rotary_table(2, 5, 8, torch.float64)
    assert torch.autograd.gradcheck(lambda a: vlmkit.rotary(a, cos, sin), (x,))


@pytest.mark.parametrize("shape", [(2, 4, 7, 16), (32, 4, 32, 32), (1, 1, 1, 2)])
def test_rotary_float32_equals_the_reference_and_keeps_the_layout(shape):
    b, h, t, dh = shape
    x = heads_view(b, t, h, dh)
    cos, sin = rotary_table(b, t, dh)
    y = vlmkit.rotary(x, cos, sin)
    ref = rotary_reference(x, cos, sin)
    assert y.stride() == x.stride() and y.dtype == torch.float32
    up = torch.linspace(-1, 1, y.numel()).view(y.shape)
    (g,) = torch.autograd.grad((y * up).sum(), x)
    (gr,) = torch.autograd.grad((ref * up).sum(), x)
    assert (y - ref).abs().max() <= 1e-6 and (g - gr).abs().max() <= 1e-6


def test_rotary_bfloat16_rounds_once():
    x = heads_view(3, 9, 2, 16, torch.bfloat16)
    cos, sin = rotary_table(3, 9, 16)
    y = vlmkit.rotary(x, cos, sin)
    exact = rotary_reference(x.detach().double(), cos.double(), sin.double())
    assert y.dtype == torch.bfloat16
    assert ((y.double() - exact).abs() <= exact.abs() * 2 ** -8 + 1e-12).all()
    # autocast's ATen ops round every product and the table to bf16: at least as far off
    assert (y.double() - exact).abs().max() <= (rotary_reference(x.detach(), cos, sin).double() - exact).abs().max()


def test_rotary_bad_inputs_are_refused_by_name():
    x = torch.randn(2, 3, 4, 8)
    cos, sin = rotary_table(2, 4, 8)
    with pytest.raises(ValueError, match="even Dh"):
        vlmkit.rotary(torch.randn(2, 3, 4, 7), cos, sin)
    with pytest.raises(ValueError, match="cos and sin"):
        vlmkit.rotary(x, cos[:, :3].contiguous(), sin)
    with pytest.raises(ValueError, match="cos and sin"):
        vlmkit.rotary(x, cos.double(), sin)
    with pytest.raises(ValueError, match="float32, float64 or bfloat16"):
        vlmkit.rotary(x.int(), cos, sin)


def test_rotary_models_train_as_with_atens_ops(kernel):
    """float64, packed rows, rotary positions in the decoder: the loss and every
    gradient of the ATen ops' (the same setting switches the attention kernel,
    which float64 at these lengths leaves to ATen either way)."""
    config = tiny("encoder_decoder", "mlp", "concat", attention="prefix_lm", loss_reduction="sample")
    config["decoder"].update({"max_len": 320, "pos_embedding": "rotary"})
    torch.manual_seed(0)
    model = vlmkit.build_model(config).double()
    kernel("aten")
    loss, ref = losses_and_grads(model, "encoder_decoder", packed=True)
    kernel("auto")
    fused_loss, fused = losses_and_grads(model, "encoder_decoder", packed=True)
    assert abs(fused_loss - loss) < 1e-9
    for name, grad in ref.items():
        assert torch.allclose(fused[name], grad, atol=1e-9, rtol=1e-7), name
