"""vlmkit's GEMMs through oneDNN (vlmkit.linear and vlmkit.matmul; kernels/gemm.h):
parity with torch.nn.functional.linear and torch.matmul for every input layout they
take, the products cut across the thread pool, second derivatives, the cases left to
ATen, whole models training with them as with ATen, and Linear under bf16 autocast
(dnnl_gemm_bf16bf16f32: autocast's rounding of the inputs and output, float32
gradients)."""
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

import vlmkit

from test_generative import ARCHS, FUSIONS, PROJECTORS, tiny
from test_packing import losses_and_grads

needs_dnnl = pytest.mark.skipif(not vlmkit.have_dnnl_sgemm(), reason="vlmkit built without oneDNN's C API")


@pytest.fixture
def gemm_kernel():
    before = vlmkit.gemm_kernel()
    yield vlmkit.set_gemm_kernel
    vlmkit.set_gemm_kernel(before)


def operands(x_shape, d_out, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*x_shape, generator=g).requires_grad_()
    w = (0.2 * torch.randn(d_out, x_shape[-1], generator=g)).requires_grad_()
    b = torch.randn(d_out, generator=g).requires_grad_() if bias else None
    return x, w, b


def forward_and_grads(fn, x, w, b):
    out = fn(x, w, b)
    upstream = torch.linspace(-1, 1, out.numel()).view(out.shape)  # every output weighs differently
    wanted = [t for t in (x, w, b) if t is not None]
    return out, torch.autograd.grad((out * upstream).sum(), wanted)


def assert_matches_aten(x, w, b, tol=1e-5):
    out, grads = forward_and_grads(vlmkit.linear, x, w, b)
    ref, ref_grads = forward_and_grads(F.linear, x, w, b)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    for a, r in zip((out, *grads), (ref, *ref_grads)):
        assert a.shape == r.shape
        if r.numel():
            assert (a - r).abs().max() <= tol * max(1.0, r.abs().max().item())


@pytest.mark.parametrize("x_shape", [(16,), (7, 16), (3, 11, 16), (2, 2, 5, 16)])
@pytest.mark.parametrize("bias", [True, False])
def test_float32_equals_aten(x_shape, bias):
    assert_matches_aten(*operands(x_shape, 24, bias))


@pytest.mark.parametrize("rows,d_in,d_out", [
    (2053, 128, 48),   # cut along the rows, the last block shorter than the others
    (40, 256, 1031),   # cut along the columns (more outputs than rows)
    (1500, 300, 70),   # the weight gradient's product cut along its columns
])
def test_products_cut_across_threads_equal_aten(rows, d_in, d_out):
    """Above 8 M multiply-adds a product is cut into blocks run on the pool's threads."""
    assert rows * d_in * d_out > 8 * 2**20
    assert_matches_aten(*operands((rows, d_in), d_out), tol=2e-5)


def test_non_contiguous_inputs():
    x, w, b = operands((6, 40), 24)
    xt = x.detach().t().contiguous().t().requires_grad_()  # column-major
    assert not xt.is_contiguous()
    assert_matches_aten(xt, w, b)
    wt = w.detach().t().contiguous().t().requires_grad_()
    assert_matches_aten(x, wt, b)
    x3 = torch.randn(4, 16, 9).transpose(1, 2).requires_grad_()  # [4, 9, 16] with strides
    assert_matches_aten(x3, *operands((9, 16), 8)[1:])


def test_empty_sizes():
    for x_shape, d_out in [((0, 8), 5), ((3, 0), 5), ((3, 8), 0)]:
        x, w, b = operands(x_shape, d_out)
        assert_matches_aten(x, w, b)
    x, w, b = operands((3, 0), 5)
    assert torch.equal(vlmkit.linear(x, w, b), b.detach().expand(3, 5))  # an empty product is zeros, not garbage


def test_second_derivatives_equal_atens():
    x, w, b = operands((5, 12), 7)
    seconds = []
    for fn in (vlmkit.linear, F.linear):
        out = fn(x, w, b)
        gx, gw = torch.autograd.grad(out.square().sum(), (x, w), create_graph=True)
        seconds.append(torch.autograd.grad(gx.square().sum() + gw.sin().sum(), (x, w, b)))
    for a, r in zip(*seconds):
        assert torch.allclose(a, r, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("x_shape,d_out", [((64, 96), 200), ((2048, 128), 512)])
def test_no_grad_gives_the_training_forward_bit_for_bit(x_shape, d_out):
    """Activation checkpointing recomputes a forward with gradients that ran without:
    both must agree exactly, the product cut across the pool's threads (second case)
    or not, and so must two runs."""
    x, w, b = operands(x_shape, d_out)
    with torch.no_grad():
        inference = vlmkit.linear(x, w, b)
    assert torch.equal(inference, vlmkit.linear(x, w, b).detach())
    assert torch.equal(inference, vlmkit.linear(x, w, b).detach())


def aten_gemm_calls(fn):
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return [e.key for e in prof.key_averages()
            if e.key in ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear")]


@needs_dnnl
def test_float32_runs_onednn_and_other_cases_run_aten(gemm_kernel):
    x, w, b = operands((32, 64), 48)
    step = lambda: vlmkit.linear(x, w, b).sum().backward()
    assert aten_gemm_calls(step) == []
    gemm_kernel("aten")
    assert "aten::linear" in aten_gemm_calls(step)
    gemm_kernel("auto")
    assert "aten::linear" in aten_gemm_calls(lambda: vlmkit.linear(x.double(), w.double(), b.double()))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert aten_gemm_calls(step) == []  # dnnl_gemm_bf16bf16f32
        gemm_kernel("aten")
        assert "aten::linear" in aten_gemm_calls(lambda: vlmkit.linear(x, w, b))


def bf16_forward_and_grads(fn, x, w, b):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return forward_and_grads(fn, x, w, b)


@pytest.mark.parametrize("x_shape", [(16,), (7, 16), (3, 11, 16), (2, 2, 5, 16)])
@pytest.mark.parametrize("bias", [True, False])
def test_autocast_rounds_as_autocast_and_keeps_float32_gradients(x_shape, bias):
    """Under bf16 autocast the output is bf16 as at::linear's; its error against a
    float64 reference of the same bf16-rounded inputs is one rounding at most, and
    the gradients come back in float32 (the inputs' dtype) at least as close to
    float64's as autocast's own."""
    x, w, b = operands(x_shape, 24, bias)
    out, grads = bf16_forward_and_grads(vlmkit.linear, x, w, b)
    ref, ref_grads = bf16_forward_and_grads(F.linear, x, w, b)
    assert out.dtype == ref.dtype == torch.bfloat16 and out.shape == ref.shape
    assert [g.dtype for g in grads] == [torch.float32] * len(grads)
    xr, wr = x.detach().bfloat16().double(), w.detach().bfloat16().double()
    exact = xr @ wr.t() + (b.detach().double() if b is not None else 0)
    assert ((out.double() - exact).abs() <= exact.abs() * 2 ** -8 + 1e-6).all()
    upstream = torch.linspace(-1, 1, out.numel()).view(out.shape).bfloat16().double()
    exact_grads = [upstream @ wr, upstream.reshape(-1, 24).t() @ xr.reshape(-1, 16)]
    if b is not None:
        exact_grads.append(upstream.reshape(-1, 24).sum(0))
    for g, r, e in zip(grads, ref_grads, exact_grads):
        e = e.reshape(g.shape)
        assert (g.double() - e).abs().max() <= (r.double() - e).abs().max() + 1e-6


def test_autocast_takes_bfloat16_weights_and_refuses_double_backward():
    x, w, b = operands((5, 16), 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = vlmkit.linear(x.bfloat16(), w.bfloat16(), b.bfloat16())
        ref = F.linear(x.bfloat16(), w.bfloat16(), b.bfloat16())
        assert out.dtype == torch.bfloat16
        assert (out.float() - ref.float()).abs().max() <= 0.02 * ref.float().abs().max()
    with pytest.raises(RuntimeError, match="double backward"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = vlmkit.linear(x, w, b).float().square().sum()
        torch.autograd.grad(y, x, create_graph=True)


def test_bad_inputs_are_refused_by_name(gemm_kernel):
    x, w, b = operands((4, 16), 8)
    with pytest.raises(RuntimeError, match="16"):
        vlmkit.linear(torch.randn(4, 15), w, b)
    with pytest.raises(RuntimeError):
        vlmkit.linear(x, w, b[:5])
    with pytest.raises(ValueError, match="auto"):
        gemm_kernel("fast")
    assert vlmkit.gemm_kernel() == "auto"


def heads(batch, length, n_heads, d_head, seed):
    """[B, H, T, Dh] views of a [B, T, H * Dh] projection, as attention makes them."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, length, n_heads * d_head, generator=g)
    return x.view(batch, length, n_heads, d_head).transpose(1, 2).requires_grad_()


def assert_matmul_matches_aten(a, b, tol=1e-5):
    outs = []
    for fn in (vlmkit.matmul, torch.matmul):
        out = fn(a, b)
        upstream = torch.linspace(-1, 1, out.numel()).view(out.shape)
        outs.append((out, torch.autograd.grad((out * upstream).sum(), (a, b))))
    (out, grads), (ref, ref_grads) = outs
    for x, r in zip((out, *grads), (ref, *ref_grads)):
        assert x.shape == r.shape
        if r.numel():
            assert (x - r).abs().max() <= tol * max(1.0, r.abs().max().item())


@pytest.mark.parametrize("batch,length,n_heads,d_head", [(2, 5, 3, 4), (8, 64, 4, 32), (1, 33, 2, 16)])
def test_matmul_of_attention_heads_equals_aten(batch, length, n_heads, d_head):
    """Scores q k^T and the output P v on head views read in place (the second case
    is 8.4 M multiply-adds: its entries run on the pool's threads)."""
    q, k, v = (heads(batch, length, n_heads, d_head, seed) for seed in range(3))
    assert_matmul_matches_aten(q, k.transpose(-2, -1))
    p = torch.softmax(torch.randn(batch, n_heads, length, length), -1).requires_grad_()
    assert_matmul_matches_aten(p, v)


def test_matmul_layouts_and_sizes():
    g = torch.Generator().manual_seed(0)
    make = lambda *s: torch.randn(*s, generator=g).requires_grad_()
    assert_matmul_matches_aten(make(3, 7, 5), make(3, 5, 6))  # 3-D, contiguous
    a = torch.randn(3, 7, 10, generator=g)[:, :, ::2].requires_grad_()  # no unit stride: copied
    assert_matmul_matches_aten(a, make(3, 5, 6))
    for a_shape, b_shape in [((0, 4, 5), (0, 5, 6)), ((2, 0, 5), (2, 5, 6)), ((2, 4, 0), (2, 0, 6))]:
        assert_matmul_matches_aten(make(*a_shape), make(*b_shape))
    assert torch.equal(vlmkit.matmul(torch.randn(2, 4, 0), torch.randn(2, 0, 6)), torch.zeros(2, 4, 6))


def test_matmul_second_derivatives_and_broadcasting_go_to_aten():
    g = torch.Generator().manual_seed(1)
    a, b = (torch.randn(2, 4, 6, 5, generator=g).requires_grad_() for _ in range(2))
    seconds = []
    for fn in (vlmkit.matmul, torch.matmul):
        ga, gb = torch.autograd.grad(fn(a, b.transpose(-2, -1)).square().sum(), (a, b), create_graph=True)
        seconds.append(torch.autograd.grad(ga.square().sum() + gb.sin().sum(), (a, b)))
    for x, r in zip(*seconds):
        assert torch.allclose(x, r, atol=1e-4, rtol=1e-4)
    w = torch.randn(5, 3)  # broadcast over a's batch: at::matmul's business
    assert torch.allclose(vlmkit.matmul(a, w), torch.matmul(a, w))


@needs_dnnl
def test_float32_matmul_runs_onednn(gemm_kernel):
    q, k = heads(2, 8, 2, 4, 0), heads(2, 8, 2, 4, 1)
    step = lambda: vlmkit.matmul(q, k.transpose(-2, -1)).sum().backward()
    assert aten_gemm_calls(step) == []
    gemm_kernel("aten")
    assert "aten::matmul" in aten_gemm_calls(step)


@pytest.mark.parametrize("arch,projector,fusion", list(itertools.product(ARCHS, PROJECTORS, FUSIONS)))
def test_float32_models_train_as_with_atens_linear(gemm_kernel, arch, projector, fusion):
    """Every Linear of the model (attention, MLPs, projector, heads) on oneDNN: ATen's
    loss and gradients to float32 rounding."""
    config = tiny(arch, projector, fusion, attention="prefix_lm", loss_reduction="sample")
    config["decoder"]["max_len"] = 320
    torch.manual_seed(0)
    model = vlmkit.build_model(config)
    results = {}
    for setting in ("aten", "auto"):
        gemm_kernel(setting)
        with torch.autocast("cpu", enabled=False):
            results[setting] = losses_and_grads(Float32(model), arch, packed=True)
    loss, ref = results["aten"]
    got_loss, got = results["auto"]
    assert abs(got_loss - loss) <= 1e-5 * max(1.0, abs(loss))
    for name, grad in ref.items():
        assert torch.allclose(got[name], grad, atol=1e-5, rtol=1e-3), name


class Float32(torch.nn.Module):
    """Feeds a float32 model the float64 images losses_and_grads makes."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, images, *rest, **kwargs):
        return self.model(images.float(), *rest, **kwargs)
