"""fp32 GEMMs of the small VLM's shapes through two libraries in one LibTorch:
OpenBLAS (torch.mm, vlmkit's fp32 thread policy: torch 1 / BLAS 2 threads) and oneDNN
(torch._C._nn.mkldnn_linear on mkldnn tensors, torch 2 / BLAS 1 threads), the latter
with and without the dense <-> mkldnn conversions a dense model would pay.

    python benchmarks/gemm_backends.py blas
    python benchmarks/gemm_backends.py dnn

One backend per process: each sets the threads before the first op. docs/benchmarks.md,
"fp32 GEMMs: oneDNN against OpenBLAS", has the figures."""
import statistics, sys, time, torch, vlmkit
def bench(f, n=60):
    for _ in range(8): f()
    ts = []
    for _ in range(n):
        t = time.perf_counter(); f(); ts.append(time.perf_counter() - t)
    return statistics.median(ts)
shapes = ((1024, 128, 512), (2048, 128, 512), (1024, 512, 128), (2048, 512, 128), (2048, 128, 128), (1024, 128, 128))
mode = sys.argv[1] if len(sys.argv) > 1 else ""
if mode not in ("blas", "dnn"):
    sys.exit("usage: gemm_backends.py blas|dnn")
if mode == "blas":
    vlmkit.set_num_threads(1, 2)
else:
    vlmkit.set_num_threads(2, 1)
print(mode, vlmkit.thread_info()["torch_threads"], vlmkit.thread_info()["blas_threads"])
for m, k, n in shapes:
    a = torch.randn(m, k); w = torch.randn(n, k)
    fl = 2 * m * k * n
    if mode == "blas":
        print(f"{m}x{k}x{n}: OpenBLAS {fl / bench(lambda: torch.mm(a, w.t())) / 1e9:.0f} GFLOP/s")
    else:
        am, wm = a.to_mkldnn(), w.to_mkldnn()
        inner = bench(lambda: torch._C._nn.mkldnn_linear(am, wm))
        conv = bench(lambda: torch._C._nn.mkldnn_linear(a.to_mkldnn(), wm).to_dense())
        print(f"{m}x{k}x{n}: oneDNN {fl / inner / 1e9:.0f} GFLOP/s, with the input/output conversions {fl / conv / 1e9:.0f}")
