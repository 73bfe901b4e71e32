"""The fused RMSNorm (vlmkit.rms_norm) and GroupNorm + GELU (vlmkit.group_norm_gelu;
kernels/norm.h): float64 gradcheck, float32 and bfloat16 parity with the ATen
reference, the dtypes they return, results independent of the thread count, whole
models with QK-norm and conv stages giving the reference's loss and gradients, and
bad inputs refused by name."""
import itertools

import pytest
import torch

import vlmkit

from test_generative import ARCHS, FUSIONS, tiny
from test_packing import losses_and_grads


def reference(x, w, eps=1e-6):
    xf = x.float() if x.dtype in (torch.bfloat16, torch.float16) else x
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return y * w


def grads(fn, x, w, **kw):
    out = fn(x, w, **kw)
    upstream = torch.linspace(-1, 1, out.numel(), dtype=torch.float64).view(out.shape).to(out.dtype)
    return out, torch.autograd.grad((out * upstream).sum(), (x, w))


def test_float64_gradcheck():
    x = torch.randn(3, 4, 7, dtype=torch.float64, requires_grad=True)
    w = (1 + 0.3 * torch.randn(7, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: vlmkit.rms_norm(a, b, 1e-6), (x, w))


@pytest.mark.parametrize("shape", [(5, 32), (2, 9, 4, 32), (3, 7), (40000, 8)])
def test_float32_equals_the_reference(shape):
    """(40000, 8): enough rows that both threads take chunks and sum their own weight gradients."""
    x = torch.randn(*shape, requires_grad=True)
    w = (1 + 0.3 * torch.randn(shape[-1])).requires_grad_()
    out, g = grads(vlmkit.rms_norm, x, w)
    ref, gr = grads(reference, x, w)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(g, gr):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)


def test_non_contiguous_input():
    x = torch.randn(4, 32, 6).transpose(1, 2).requires_grad_()  # last dim strided
    w = torch.rand(32).requires_grad_()
    out, g = grads(vlmkit.rms_norm, x, w)
    ref, gr = grads(reference, x, w)
    assert torch.allclose(out, ref, atol=1e-5)
    for a, b in zip(g, gr):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)


def test_bfloat16_input_with_float32_weight():
    """What QK-norm sees under autocast: statistics in float32; the result in float32 by
    default (the promotion, as the ATen ops give) or in bfloat16 when asked, and a float32
    weight gradient beside a bfloat16 input gradient."""
    x = torch.randn(64, 4, 32).bfloat16().requires_grad_()
    w = (1 + 0.3 * torch.randn(32)).requires_grad_()
    out, g = grads(vlmkit.rms_norm, x, w)
    ref, gr = grads(reference, x, w)
    assert out.dtype == ref.dtype == torch.float32
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-5)
    assert g[0].dtype == torch.bfloat16 and g[1].dtype == torch.float32
    for a, b in zip(g, gr):
        assert (a.float() - b.float()).abs().max() <= 1e-2 * b.float().abs().max()
    low, gl = grads(vlmkit.rms_norm, x, w, out_dtype=torch.bfloat16)
    assert low.dtype == torch.bfloat16
    # one rounding of the float32 result: within half a bfloat16 ulp (2^-8 relative)
    assert ((low.float() - ref.detach()).abs() <= 2 ** -8 * ref.detach().abs() + 1e-6).all()
    for a, b in zip(gl, gr):
        assert (a.float() - b.float()).abs().max() <= 2e-2 * b.float().abs().max()


def test_no_grad_gives_the_training_forward():
    x, w = torch.randn(6, 32), torch.rand(32)
    with torch.no_grad():
        inference = vlmkit.rms_norm(x, w)
    assert torch.equal(inference, vlmkit.rms_norm(x, w.requires_grad_()).detach())


def test_bad_inputs_are_refused_by_name():
    x, w = torch.randn(4, 32), torch.ones(32)
    with pytest.raises(ValueError, match=r"x \[\.\.\., D\] and weight \[D\]"):
        vlmkit.rms_norm(x, torch.ones(31))
    with pytest.raises(ValueError, match="float32, float64 or bfloat16"):
        vlmkit.rms_norm(x.half(), w.half())
    with pytest.raises(ValueError, match="weight of x's dtype"):
        vlmkit.rms_norm(x, w.double())
    with pytest.raises(ValueError, match="eps must be a positive number"):
        vlmkit.rms_norm(x, w, 0.0)
    with pytest.raises(TypeError, match="torch.dtype or None"):
        vlmkit.rms_norm(x, w, 1e-6, "bfloat16")
    with pytest.raises(ValueError, match="auto"):
        vlmkit.set_norm_kernel("fast")
    out = vlmkit.rms_norm(x.requires_grad_(), w)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(out.sum(), x, create_graph=True)


@pytest.fixture
def norm_kernel():
    before = vlmkit.norm_kernel()
    yield vlmkit.set_norm_kernel
    vlmkit.set_norm_kernel(before)


@pytest.mark.parametrize("arch,fusion", list(itertools.product(ARCHS, FUSIONS)))
def test_qk_norm_models_train_with_the_fused_norm_as_with_aten(norm_kernel, arch, fusion):
    """float64, packed rows, QK-norm in self- and cross-attention and RMSNorm blocks:
    the reference's loss and gradients for every parameter."""
    config = tiny(arch, "mlp", fusion, attention="prefix_lm", loss_reduction="sample")
    config["decoder"].update({"max_len": 320, "qk_norm": True, "norm": "rmsnorm"})
    torch.manual_seed(0)
    model = vlmkit.build_model(config).double()
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            torch.nn.init.uniform_(p, 0.5, 1.5)  # norms start at 1: give their gradients something to show
    norm_kernel("aten")
    loss, ref = losses_and_grads(model, arch, packed=True)
    norm_kernel("auto")
    fused_loss, fused = losses_and_grads(model, arch, packed=True)
    assert abs(fused_loss - loss) < 1e-9
    assert any("q_norm" in n for n in ref)
    for name, grad in ref.items():
        assert torch.allclose(fused[name], grad, atol=1e-9, rtol=1e-7), name


def test_bf16_autocast_training_step_matches_aten(norm_kernel):
    """The packed bf16 path that once gave NaN: finite, and the reference's loss and
    gradients to bfloat16 rounding."""
    config = tiny("encoder_decoder", "mlp", "cross_attention", attention="prefix_lm", loss_reduction="sample")
    config["decoder"].update({"max_len": 320, "qk_norm": True})
    torch.manual_seed(0)
    model = vlmkit.build_model(config).float()
    # losses_and_grads' float64 images, as float32 for this float32 model
    model_forward = model.forward
    model.forward = lambda images, *a, **k: model_forward(images.float(), *a, **k)
    losses = {}
    for setting in ("aten", "auto"):
        norm_kernel(setting)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            losses[setting] = losses_and_grads(model, "encoder_decoder", packed=True)
    loss, ref = losses["aten"]
    fused_loss, fused = losses["auto"]
    assert torch.isfinite(torch.tensor(fused_loss)) and abs(fused_loss - loss) < 2e-2 * abs(loss)
    for name, grad in ref.items():
        assert torch.isfinite(fused[name]).all(), name
        assert (fused[name] - grad).abs().max() <= 5e-2 * grad.abs().max() + 1e-6, name


# --- GroupNorm + GELU -------------------------------------------------------------

def gn_reference(x, groups, w, b, eps=1e-5):
    return torch.nn.functional.gelu(torch.nn.functional.group_norm(x, groups, w, b, eps))


def gn_grads(fn, x, groups, w, b):
    out = fn(x, groups, w, b)
    upstream = torch.linspace(-1, 1, out.numel(), dtype=torch.float64).view(out.shape).to(out.dtype)
    wanted = [t for t in (x, w, b) if t is not None]
    return out, torch.autograd.grad((out * upstream).sum(), wanted)


@pytest.mark.parametrize("affine", [True, False])
def test_group_norm_gelu_float64_gradcheck(affine):
    x = torch.randn(2, 6, 5, 3, dtype=torch.float64, requires_grad=True)
    w = (1 + 0.3 * torch.randn(6, dtype=torch.float64)).requires_grad_() if affine else None
    b = (0.5 * torch.randn(6, dtype=torch.float64)).requires_grad_() if affine else None
    inputs = (x, w, b) if affine else (x,)
    fn = (lambda a, c, d: vlmkit.group_norm_gelu(a, 3, c, d)) if affine else (lambda a: vlmkit.group_norm_gelu(a, 3))
    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("shape,groups", [((4, 32, 16, 16), 8), ((3, 6, 7), 3), ((2, 8, 3, 4, 5), 8),
                                          ((2, 4, 17), 1), ((96, 32, 8, 8), 4)])
def test_group_norm_gelu_float32_equals_the_reference(shape, groups):
    """(96, 32, 8, 8): enough elements for both threads."""
    x = (2 * torch.randn(*shape) + 0.5).requires_grad_()
    w = (1 + 0.3 * torch.randn(shape[1])).requires_grad_()
    b = (0.5 * torch.randn(shape[1])).requires_grad_()
    out, g = gn_grads(vlmkit.group_norm_gelu, x, groups, w, b)
    ref, gr = gn_grads(gn_reference, x, groups, w, b)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    for a, r in zip((out, *g), (ref, *gr)):
        assert (a - r).abs().max() <= 2e-5 * max(1.0, r.abs().max().item())


def test_group_norm_gelu_bfloat16_input_with_float32_weight():
    """The conv stage under autocast: a bf16 convolution output, float32 affine
    parameters, a bf16 result (one rounding of the float32 value) and float32
    parameter gradients."""
    x = torch.randn(4, 16, 8, 8).bfloat16().requires_grad_()
    w = (1 + 0.3 * torch.randn(16)).requires_grad_()
    b = (0.5 * torch.randn(16)).requires_grad_()
    out, (gx, gw, gb) = gn_grads(vlmkit.group_norm_gelu, x, 4, w, b)
    ref = gn_reference(x.detach().float(), 4, w.detach(), b.detach())
    assert out.dtype == torch.bfloat16 and gx.dtype == torch.bfloat16
    assert gw.dtype == gb.dtype == torch.float32
    assert ((out.float() - ref).abs() <= ref.abs() * 2 ** -8 + 1e-5).all()
    xf = x.detach().float().requires_grad_()
    _, (rx, rw, rb) = gn_grads(gn_reference, xf, 4, w, b)
    for a, r in ((gx, rx), (gw, rw), (gb, rb)):
        assert (a.float() - r).abs().max() <= 2e-2 * r.abs().max()


def test_group_norm_gelu_is_the_same_on_one_or_two_threads():
    x = torch.randn(64, 32, 8, 8, requires_grad=True)
    w = (1 + 0.3 * torch.randn(32)).requires_grad_()
    b = torch.randn(32).requires_grad_()
    before = vlmkit.thread_info()
    results = []
    try:
        for threads in (1, 2):
            vlmkit.set_num_threads(threads, 1)
            results.append(gn_grads(vlmkit.group_norm_gelu, x, 8, w, b))
    finally:
        vlmkit.set_num_threads(before["torch_threads"], before["blas_threads"])
    (o1, g1), (o2, g2) = results
    assert torch.equal(o1, o2) and all(torch.equal(a, c) for a, c in zip(g1, g2))


def test_group_norm_gelu_bad_inputs_are_refused_by_name():
    x = torch.randn(2, 6, 4, 4)
    with pytest.raises(ValueError, match="groups >= 1 dividing the 6 channels"):
        vlmkit.group_norm_gelu(x, 4)
    with pytest.raises(ValueError, match=r"expected weight \[6\]"):
        vlmkit.group_norm_gelu(x, 3, torch.ones(5))
    with pytest.raises(ValueError, match="float32, float64 or bfloat16"):
        vlmkit.group_norm_gelu(x.int(), 3)
    with pytest.raises(ValueError, match=r"\[N, C, ...\]"):
        vlmkit.group_norm_gelu(torch.randn(6), 3)
    with pytest.raises(ValueError, match="eps must be a positive number"):
        vlmkit.group_norm_gelu(x, 3, eps=0.0)
    with pytest.raises(ValueError, match="bias of x's dtype"):
        vlmkit.group_norm_gelu(x.double(), 3, None, torch.zeros(6, dtype=torch.int64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_group_norm_gelu_channels_last_equals_contiguous(dtype):
    """The conv stage runs channels last: the same values and gradients as the
    plain layout (to rounding: the sums run in another order), in the input's layout."""
    x = (2 * torch.randn(6, 32, 9, 7) + 0.5).to(dtype)
    w = (1 + 0.3 * torch.randn(32)).requires_grad_()
    b = (0.5 * torch.randn(32)).requires_grad_()
    xc = x.clone().requires_grad_()
    xl = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    out_c, g_c = gn_grads(vlmkit.group_norm_gelu, xc, 8, w, b)
    out_l, g_l = gn_grads(vlmkit.group_norm_gelu, xl, 8, w, b)
    assert out_l.is_contiguous(memory_format=torch.channels_last) and not out_l.is_contiguous()
    assert g_l[0].is_contiguous(memory_format=torch.channels_last)
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    for a, r in zip((out_l, *g_l), (out_c, *g_c)):
        assert (a.float() - r.float()).abs().max() <= tol * max(1.0, r.float().abs().max().item())
