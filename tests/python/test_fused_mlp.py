"""The fused GELU MLP (vlmkit.fused_gelu_mlp; kernels/mlp.h): float64 gradcheck,
float32 and bfloat16-autocast parity with ATen's Linear-gelu-Linear, whole models
giving ATen's loss and gradients with it, and the blocks it must leave to ATen
(dropout while training, unmerged LoRA adapters)."""
import itertools

import pytest
import torch
import torch.nn.functional as F

import vlmkit
from vlmkit import lora

from test_generative import ARCHS, FUSIONS, PROJECTORS, tiny
from test_packing import losses_and_grads


def reference(x, w1, b1, w2, b2):
    return F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)


def weights(d_in, hidden, d_out, dtype, bias=True, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda *s: (scale * torch.randn(*s, generator=g, dtype=torch.float64)).to(dtype).requires_grad_()
    return make(hidden, d_in), make(hidden) if bias else None, make(d_out, hidden), make(d_out) if bias else None


def grads(fn, inputs):
    out = fn(*inputs)
    # a non-uniform upstream gradient, so every output position weighs differently
    upstream = torch.linspace(-1, 1, out.numel(), dtype=torch.float64).view(out.shape).to(out.dtype)
    wanted = [t for t in inputs if t is not None]
    return out, torch.autograd.grad((out * upstream).sum(), wanted)


@pytest.mark.parametrize("bias", [True, False])
def test_float64_gradcheck(bias):
    x = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    w1, b1, w2, b2 = weights(5, 12, 4, torch.float64, bias)
    assert torch.autograd.gradcheck(vlmkit.fused_gelu_mlp, (x, w1, b1, w2, b2))


@pytest.mark.parametrize("shape", [(7, 16), (3, 11, 16), (2, 2, 5, 16)])
def test_float32_equals_aten(shape):
    x = torch.randn(*shape, requires_grad=True)
    inputs = (x, *weights(16, 64, 8, torch.float32, scale=0.3))
    out, g = grads(vlmkit.fused_gelu_mlp, inputs)
    ref, gr = grads(reference, inputs)
    assert out.shape == ref.shape
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(g, gr):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)


def test_gelu_matches_aten_across_its_range():
    """Large negative inputs included, where Phi(x) is tiny and a 1 - erf form loses it."""
    h = torch.linspace(-12, 12, 100_001, dtype=torch.float32)[:, None]
    eye = torch.eye(1)
    out = vlmkit.fused_gelu_mlp(h, eye, None, eye, None)[:, 0]
    assert torch.allclose(out, F.gelu(h[:, 0]), atol=1e-6, rtol=1e-5)
    h = h.requires_grad_()
    (dx,) = torch.autograd.grad(vlmkit.fused_gelu_mlp(h, eye, None, eye, None).sum(), h)
    h2 = h.detach().requires_grad_()
    (ref,) = torch.autograd.grad(F.gelu(h2).sum(), h2)
    assert torch.allclose(dx, ref, atol=1e-6, rtol=1e-5)


def test_bfloat16_autocast_computes_as_aten_does():
    """Under CPU autocast the GEMMs run in bfloat16 and the float32 weights get float32 gradients."""
    x = torch.randn(64, 32, requires_grad=True)
    inputs = (x, *weights(32, 128, 32, torch.float32, scale=0.1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, g = grads(vlmkit.fused_gelu_mlp, inputs)
        ref, gr = grads(reference, inputs)
    assert out.dtype == ref.dtype == torch.bfloat16
    assert torch.allclose(out.float(), ref.float(), atol=2e-2, rtol=2e-2)
    for a, b, t in zip(g, gr, inputs):
        assert a.dtype == t.dtype == b.dtype
        assert (a - b).abs().max() <= 1e-2 * b.abs().max(), "gradient differs beyond bfloat16 rounding"


def test_bfloat16_tensors():
    x = torch.randn(9, 16).bfloat16().requires_grad_()
    inputs = (x, *weights(16, 64, 16, torch.bfloat16, scale=0.2))
    out, g = grads(vlmkit.fused_gelu_mlp, inputs)
    ref, gr = grads(reference, inputs)
    assert out.dtype == torch.bfloat16
    assert torch.allclose(out.float(), ref.float(), atol=3e-2, rtol=3e-2)
    for a, b in zip(g, gr):
        assert (a.float() - b.float()).abs().max() <= 2e-2 * b.float().abs().max()


def test_no_grad_gives_the_training_forward():
    inputs = (torch.randn(5, 16), *weights(16, 32, 16, torch.float32))
    with torch.no_grad():
        inference = vlmkit.fused_gelu_mlp(*inputs)
    assert torch.equal(inference, vlmkit.fused_gelu_mlp(*inputs).detach())


def test_bad_inputs_are_refused_by_name():
    w1, b1, w2, b2 = weights(16, 32, 8, torch.float32)
    x = torch.randn(4, 16)
    with pytest.raises(ValueError, match=r"w1 \[hidden, in\]"):
        vlmkit.fused_gelu_mlp(torch.randn(4, 15), w1, b1, w2, b2)
    with pytest.raises(ValueError, match=r"w2 \[out, hidden\]"):
        vlmkit.fused_gelu_mlp(x, w1, b1, w2[:, :31], b2)
    with pytest.raises(ValueError, match=r"biases \[hidden\] and \[out\]"):
        vlmkit.fused_gelu_mlp(x, w1, b1[:5], w2, b2)
    with pytest.raises(ValueError, match="weights of x's dtype"):
        vlmkit.fused_gelu_mlp(x.double(), w1, b1, w2, b2)
    with pytest.raises(ValueError, match="float32, float64 or bfloat16"):
        vlmkit.fused_gelu_mlp(x.half(), w1.half(), None, w2.half(), None)
    with pytest.raises(ValueError, match="auto"):
        vlmkit.set_mlp_kernel("fast")
    out = vlmkit.fused_gelu_mlp(x.requires_grad_(), w1, b1, w2, b2)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(out.sum(), x, create_graph=True)


@pytest.fixture
def mlp_kernel():
    before = vlmkit.mlp_kernel()
    yield vlmkit.set_mlp_kernel
    vlmkit.set_mlp_kernel(before)


@pytest.mark.parametrize("arch,projector,fusion", list(itertools.product(ARCHS, PROJECTORS, FUSIONS)))
def test_models_train_with_the_fused_mlp_as_with_aten(mlp_kernel, arch, projector, fusion):
    """float64, packed rows: ATen's loss and gradients for every parameter (image
    encoder, text encoder and decoder blocks all run the fused MLP)."""
    config = tiny(arch, projector, fusion, attention="prefix_lm", loss_reduction="sample")
    config["decoder"]["max_len"] = 320
    torch.manual_seed(0)
    model = vlmkit.build_model(config).double()
    mlp_kernel("aten")
    loss, ref = losses_and_grads(model, arch, packed=True)
    mlp_kernel("auto")
    fused_loss, fused = losses_and_grads(model, arch, packed=True)
    assert abs(fused_loss - loss) < 1e-9
    for name, grad in ref.items():
        assert torch.allclose(fused[name], grad, atol=1e-9, rtol=1e-7), name


@pytest.mark.parametrize("arch", ["two_tower", "two_leg"])
def test_two_encoder_models_give_atens_loss_and_gradients(mlp_kernel, arch):
    torch.manual_seed(0)
    config = vlmkit.default_config(arch)
    for part in ("image_encoder", "text_encoder"):
        config[part].update({"d_model": 32, "depth": 1, "num_heads": 4, "image_size": 32} if part == "image_encoder"
                            else {"d_model": 32, "depth": 1, "num_heads": 4})
    model = vlmkit.build_model(config).double()
    images = torch.rand(3, 3, 32, 32, dtype=torch.float64)
    ids = torch.randint(4, 100, (3, 12))
    out = {}
    for setting in ("aten", "auto"):
        mlp_kernel(setting)
        model.zero_grad()
        result = model(images, ids)
        loss = result.loss if result.loss is not None else result.logits.square().mean()
        loss.backward()
        out[setting] = (loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert abs(out["auto"][0] - out["aten"][0]) < 1e-9
    for name, grad in out["aten"][1].items():
        assert torch.allclose(out["auto"][1][name], grad, atol=1e-9, rtol=1e-7), name


def test_dropout_while_training_keeps_atens_mlp(mlp_kernel):
    """Dropout sits between gelu and fc2 in ATen's MLP: with dropout on, the same RNG
    seed must give the same loss under both settings (the fused path has no dropout)."""
    config = tiny("encoder_decoder", "mlp", "concat")
    config["decoder"]["dropout"] = 0.3
    torch.manual_seed(0)
    model = vlmkit.build_model(config).double().train()
    losses = {}
    for setting in ("aten", "auto"):
        mlp_kernel(setting)
        torch.manual_seed(1)
        losses[setting] = losses_and_grads(model, "encoder_decoder", packed=False)[0]
    assert losses["auto"] == losses["aten"]


def test_unmerged_lora_adapters_train_as_with_aten(mlp_kernel):
    torch.manual_seed(0)
    model = vlmkit.build_model(tiny("encoder_decoder", "mlp", "concat")).double()
    lora.apply(model, rank=4, target_modules=["fc1", "fc2"], freeze_base=False)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)  # B starts at 0; give the adapter a contribution
    out = {}
    for setting in ("aten", "auto"):
        mlp_kernel(setting)
        out[setting] = losses_and_grads(model, "encoder_decoder", packed=False)
    assert abs(out["auto"][0] - out["aten"][0]) < 1e-9
    adapters = [n for n in out["aten"][1] if "lora_A" in n]
    assert adapters
    for name in adapters:
        assert torch.allclose(out["auto"][1][name], out["aten"][1][name], atol=1e-9), name
