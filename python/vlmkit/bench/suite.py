"""vlmkit's benchmark suite: vlmkit beside a plain-PyTorch peer, in one run.

    vlmkit bench [--quick] [--out results/bench]
    make bench            # quick mode, then the C++ microbenchmarks; make bench-full for everything

Every comparison is measured interleaved (vlmkit, peer, vlmkit, peer, ...) on
the same thread settings and reported as medians and vlmkit / peer ratios.
Writes results.json, results.md and PNG plots under --out. What it measures:

* fp32 GEMM peak of this machine (the higher of torch.mm and, on CPU, oneDNN's
  sgemm as vlmkit's Linear runs it; best of several sizes), the limit that
  achieved GFLOP/s are compared with;
* training step (forward + backward + AdamW) and forward throughput of every
  architecture with default blocks and of each projector x fusion on the
  encoder-decoder, with the FLOPs counted by torch.profiler on the peer (same shapes);
* training throughput on real batches of the default data: padded, length-grouped
  and packed rows, beside the peer on padded batches;
* generation latency per token at batch 1 and 8, with and without KV cache;
* peak memory (RSS) of a training run, each implementation in its own process;
* scaling with image resolution, text length and batch size (PNG plots);
* the image loader against PIL + torchvision (vlmkit.bench.loader).

``--device cuda`` runs the same comparisons on the GPU: both sides' models, batches
and optimizers there (the peer's torch.optim.AdamW takes torch's default foreach
path; vlmkit's FusedAdamW its foreach path), torch.cuda.synchronize() before every
timer reads, bf16 under torch.autocast("cuda"), and peak memory from
torch.cuda.max_memory_allocated in a fresh process per implementation. The loader
and the real-batch rows are CPU-only (the Loader is the CPU pipeline) and are left
out there, as are the CPU targets.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List, Tuple

import torch

import vlmkit
from vlmkit.train_vlm import SMALL_VLM

from . import peers

# ------------------------------------------------------------------ helpers

#: Where models, batches and optimizers live (``--device``); timers synchronise it.
DEVICE = torch.device("cpu")


def set_device(device: str) -> None:
    global DEVICE
    try:
        dev = torch.device(device)
    except RuntimeError:
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise SystemExit(f"--device: expected cpu, cuda or cuda:N, got {device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {device}: this torch ({torch.__version__}) sees no CUDA device")
    DEVICE = dev


def sync() -> None:
    """Wait for the device's queued kernels, so that a timer reads finished work."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def interleaved(fns: Dict[str, Callable[[], None]], repeats: int, warmup: int = 2) -> Dict[str, float]:
    """Median seconds per call of each function, run A B A B ... after warm-up."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: Dict[str, List[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times[k].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def gemm_sizes(quick: bool) -> Tuple[int, ...]:
    if DEVICE.type == "cuda":
        return (2048, 8192) if quick else (1024, 2048, 4096, 8192)
    return (512, 1024) if quick else (256, 512, 1024, 2048)


def gemm_peak(quick: bool) -> Dict[str, float]:
    """The fp32 GEMM peak of this machine: the higher of torch.mm (on CUDA with torch's
    default, TF32 off for matmul; on Debian's CPU LibTorch, OpenBLAS) and, on CPU where
    vlmkit has it, oneDNN's sgemm as vlmkit's float32 Linear runs it (vlmkit.linear
    without a bias, no autograd), both with vlmkit's thread policy. Achieved GFLOP/s
    are compared with the higher one: a share of the slower library's peak would
    credit vlmkit for picking the faster library."""
    def measure(mm) -> Dict[str, float]:
        per_size = {}
        work = 2e12 if DEVICE.type == "cuda" else 2e9
        for n in gemm_sizes(quick):
            a, b = torch.randn(n, n, device=DEVICE), torch.randn(n, n, device=DEVICE)
            reps = max(3, int(work / (2 * n ** 3)))
            mm(a, b)
            best = 0.0
            for _ in range(3):  # a peak: the best of three blocks (this machine's neighbours are noisy)
                sync()
                start = time.perf_counter()
                for _ in range(reps):
                    mm(a, b)
                sync()
                best = max(best, 2 * n ** 3 * reps / (time.perf_counter() - start) / 1e9)
            per_size[str(n)] = best
        return {"gflops": max(per_size.values()), "per_size": per_size}

    out = {"torch_mm": measure(torch.mm)}
    if DEVICE.type == "cpu" and vlmkit.have_dnnl_sgemm() and vlmkit.gemm_kernel() == "auto":
        with torch.no_grad():
            out["onednn"] = measure(lambda a, b: vlmkit.linear(a, b))  # a b^T: the same FLOPs as a b
    best = max(out.values(), key=lambda r: r["gflops"])
    out.update(gflops=best["gflops"], per_size=best["per_size"],
               source="oneDNN sgemm" if best is out.get("onednn") else "torch.mm")
    return out


def gemm_peak_bf16(quick: bool) -> Dict[str, float]:
    """bf16 torch.mm (oneDNN on CPU, cuBLAS on CUDA) with torch's threads on every
    core, as bf16 training runs."""
    before = vlmkit.thread_info()
    vlmkit.set_num_threads(os.cpu_count() or 1, 1)
    work = 8e12 if DEVICE.type == "cuda" else 4e9
    try:
        best, per_size = 0.0, {}
        for n in gemm_sizes(quick):
            a = torch.randn(n, n, device=DEVICE).bfloat16()
            b = torch.randn(n, n, device=DEVICE).bfloat16()
            reps = max(3, int(work / (2 * n ** 3)))
            torch.mm(a, b)
            sync()
            start = time.perf_counter()
            for _ in range(reps):
                torch.mm(a, b)
            sync()
            per_size[str(n)] = 2 * n ** 3 * reps / (time.perf_counter() - start) / 1e9
            best = max(best, per_size[str(n)])
    finally:
        vlmkit.set_num_threads(before["torch_threads"], before["blas_threads"])
    return {"gflops": best, "per_size": per_size}


def train_bf16(config: Dict, batch: int, repeats: int, text_len: int = 32) -> Dict:
    """Training steps under bfloat16 autocast, vlmkit and the peer alike (torch.autocast
    around each forward and loss; float32 weights and AdamW), both with torch's threads
    on every core; beside vlmkit's own fp32 step with its default threads."""
    model, peer, full = pair(config)
    images, ids, labels = batch_for(full, batch, text_len)
    opt_v = vlmkit.FusedAdamW(model.parameters(), lr=1e-4)  # the Trainer's optimizer
    opt_p = torch.optim.AdamW(peer.parameters(), lr=1e-4)

    def autocast(fn):
        def run():
            with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
                loss = fn()
            return loss.float()
        return run
    step_v = training_step(model, autocast(lambda: vlmkit_loss(model, full, images, ids, labels)), opt_v)
    step_p = training_step(peer, autocast(lambda: peer(images, ids, labels)[1]), opt_p)
    fp32 = training_step(model, lambda: vlmkit_loss(model, full, images, ids, labels), opt_v)
    before = vlmkit.thread_info()
    fp32_t = interleaved({"vlmkit_fp32": fp32}, repeats)
    vlmkit.set_num_threads(os.cpu_count() or 1, 1)
    try:
        t = interleaved({"vlmkit": step_v, "peer": step_p}, repeats)
    finally:
        vlmkit.set_num_threads(before["torch_threads"], before["blas_threads"])
    return {"batch": batch, "train_s": {**t, **fp32_t},
            "train_samples_per_s": {k: batch / v for k, v in {**t, **fp32_t}.items()},
            "ratio": t["peer"] / t["vlmkit"], "speedup_over_fp32": fp32_t["vlmkit_fp32"] / t["vlmkit"]}


def real_batches(quick: bool, repeats: int) -> Dict:
    """Training throughput on real batches of ``vlmkit train``'s default data (synthetic
    scenes, every task, batch 32, the run's precision and thread policy), the Loader
    decoding on 2 workers in every case: vlmkit's Trainer with one example per row
    padded to the longest, with length-grouped batches, and with packed rows (the
    default), beside the peer trained on the padded batches by a plain torch loop
    (torch.autocast in bf16, AdamW). Also the share of padded text positions."""
    import tempfile

    from vlmkit import data
    from vlmkit.train_vlm import image_tokens_per_placeholder, resolve_precision, write_task_manifest
    from vlmkit.trainer import Trainer

    precision = resolve_precision("auto")
    manifest = write_task_manifest(tempfile.mkdtemp(prefix="vlmkit-bench-"), 40 if quick else 120, 0, 64)
    model, peer, full = pair(SMALL_VLM)
    modes = {"padded": {}, "grouped": {"group_by_length": True},
             "packed": {"pack_to": full["decoder"]["max_len"],
                        "pack_image_tokens": image_tokens_per_placeholder(model, 64)}}
    steps = 6 if quick else 12

    def loader(seed, **kwargs):
        return data.Loader(manifest, batch_size=32, num_workers=2, image_size=64, seed=seed, drop_last=True,
                           color_jitter=0.1, **kwargs)

    optimizer = torch.optim.AdamW(peer.parameters(), lr=1e-4)

    def peer_run(seed):
        start, seen = time.perf_counter(), 0
        for _, b in zip(range(steps), loader(seed)):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                loss = peer(b["images"], b["input_ids"], b["labels"])[1]
            optimizer.zero_grad(set_to_none=True)
            loss.float().backward()
            optimizer.step()
            seen += len(b["indices"])
        return seen / (time.perf_counter() - start)

    rates: Dict[str, List[float]] = {k: [] for k in list(modes) + ["peer"]}
    before = vlmkit.thread_info()
    if precision == "bf16":  # what `vlmkit train` does
        vlmkit.set_num_threads(os.cpu_count() or 1, 1)
    try:
        for r in range(repeats):
            for name, kwargs in modes.items():
                trainer = Trainer(model, steps=steps, lr=1e-4, warmup_steps=1, log_every=10 ** 6, precision=precision)
                rates[name].append(trainer.fit(loader(r, **kwargs), on_log=lambda record: None)["samples_per_second"])
            rates["peer"].append(peer_run(r))
    finally:
        vlmkit.set_num_threads(before["torch_threads"], before["blas_threads"])
    padding = {}
    for name, kwargs in modes.items():
        pad = total = 0
        for b in loader(0, **kwargs):
            pad += int(b["padding_mask"].sum())
            total += b["padding_mask"].numel()
        padding[name] = pad / total
    sps = {k: statistics.median(v) for k, v in rates.items()}
    return {"precision": precision, "steps": steps, "samples_per_s": sps, "padding": padding,
            "packed_over_padded": sps["packed"] / sps["padded"], "packed_over_peer": sps["packed"] / sps["peer"],
            "grouped_over_padded": sps["grouped"] / sps["padded"]}


def batch_for(config: Dict, batch: int, text_len: int = 32, seed: int = 0):
    """A random batch for ``config`` on DEVICE: images, token ids, labels (or None)."""
    out = _batch_on_cpu(config, batch, text_len, seed)
    return tuple(None if t is None else t.to(DEVICE) for t in out)


def _batch_on_cpu(config: Dict, batch: int, text_len: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    size = config["image_encoder"]["image_size"]
    images = torch.randn(batch, 3, size, size, generator=g)
    arch = config["architecture"]
    if arch == "encoder_decoder":
        vocab = config["decoder"]["vocab_size"]
        ids = torch.randint(8, vocab, (batch, text_len), generator=g)
        ids[:, 1] = config.get("image_token_id", 3)
        labels = ids.clone()
        labels[:, :4] = -100
        return images, ids, labels
    vocab = config["text_encoder"]["vocab_size"]
    ids = torch.randint(8, vocab, (batch, min(text_len, config["text_encoder"]["max_len"])), generator=g)
    if arch == "two_leg":
        return images, ids, torch.randint(0, config["head"]["num_classes"], (batch,), generator=g)
    return images, ids, None


def vlmkit_loss(model, config, images, ids, labels):
    if config["architecture"] in ("encoder_decoder", "two_leg"):
        return model(images, ids, None, labels).loss
    return model(images, ids).loss


def training_step(model, loss_fn, optimizer):
    def step():
        optimizer.zero_grad(set_to_none=True)
        loss_fn().backward()
        optimizer.step()
    return step


def flops_per_forward(peer, config, images, ids, labels) -> float:
    """FLOPs of one forward pass, counted by torch.profiler on the peer."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof:  # counts from shapes, any device
        with torch.no_grad():
            peer(images, ids, labels)
    return float(sum(e.flops for e in prof.key_averages() if e.flops))


def pair(config: Dict) -> Tuple[torch.nn.Module, torch.nn.Module, Dict]:
    torch.manual_seed(0)
    model = vlmkit.build_model(config)
    full = model.config
    torch.manual_seed(0)
    peer = peers.build_peer(full)
    assert peers.parameter_count(peer) == sum(p.numel() for p in model.parameters()), "peer differs in size"
    return model.to(DEVICE), peer.to(DEVICE), full


def train_and_forward(config: Dict, batch: int, repeats: int, text_len: int = 32) -> Dict:
    model, peer, full = pair(config)
    images, ids, labels = batch_for(full, batch, text_len)
    opt_v = vlmkit.FusedAdamW(model.parameters(), lr=1e-4)  # the Trainer's optimizer
    opt_p = torch.optim.AdamW(peer.parameters(), lr=1e-4)
    step_v = training_step(model, lambda: vlmkit_loss(model, full, images, ids, labels), opt_v)
    step_p = training_step(peer, lambda: peer(images, ids, labels)[1], opt_p)
    train = interleaved({"vlmkit": step_v, "peer": step_p}, repeats)

    def fwd_v():
        with torch.no_grad():
            vlmkit_loss(model, full, images, ids, labels)

    def fwd_p():
        with torch.no_grad():
            peer(images, ids, labels)
    forward = interleaved({"vlmkit": fwd_v, "peer": fwd_p}, repeats)
    flops = flops_per_forward(peer, full, images, ids, labels)
    tokens = batch * ids.shape[1]
    return {"batch": batch, "text_len": int(ids.shape[1]), "params_m": peers.parameter_count(peer) / 1e6,
            "train_s": train, "forward_s": forward, "train_flops": 3 * flops, "forward_flops": flops,
            "train_samples_per_s": {k: batch / v for k, v in train.items()},
            "train_tokens_per_s": {k: tokens / v for k, v in train.items()},
            "forward_samples_per_s": {k: batch / v for k, v in forward.items()},
            "train_ratio": train["peer"] / train["vlmkit"], "forward_ratio": forward["peer"] / forward["vlmkit"]}


def generation(config: Dict, batch: int, new_tokens: int, repeats: int) -> Dict:
    model, peer, full = pair(config)
    model.eval()
    peer.eval()
    images, ids, _ = batch_for(full, batch, 12)
    prompts = [[int(t) for t in row] for row in ids]
    out = {}
    for cache in (True, False):
        # Both generate exactly new_tokens tokens (no stop token): same work.
        fns = {"vlmkit": lambda: model.cpp_module.generate_ids(images, prompts, max_new_tokens=new_tokens,
                                                               stop_tokens=[], use_cache=cache),
               "peer": lambda: peer.generate(images, ids, new_tokens, use_cache=cache)}
        t = interleaved(fns, repeats, warmup=1)
        out["cache" if cache else "no_cache"] = {
            "ms_per_token": {k: 1e3 * v / new_tokens for k, v in t.items()},
            "tokens_per_s": {k: batch * new_tokens / v for k, v in t.items()},
            "ratio": t["peer"] / t["vlmkit"]}
    return out


MEMORY_PROBE = r"""
import json, sys, threading, time, torch
import vlmkit
from vlmkit.bench import suite
def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2 ** 20
config, impl, batch, steps = json.loads(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
suite.set_device(sys.argv[5])
cuda = suite.DEVICE.type == "cuda"  # then the allocator's own peak: weights, AdamW state, activations
base, peak, done = rss_mb(), [0.0], []
def sample():
    while not done:
        peak[0] = max(peak[0], rss_mb())
        time.sleep(0.002)
if not cuda:
    threading.Thread(target=sample, daemon=True).start()
model, peer, full = suite.pair(config)
net = model if impl == "vlmkit" else peer
del model, peer
images, ids, labels = suite.batch_for(full, batch)
opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
for _ in range(steps):
    opt.zero_grad(set_to_none=True)
    loss = suite.vlmkit_loss(net, full, images, ids, labels) if impl == "vlmkit" else net(images, ids, labels)[1]
    loss.backward()
    opt.step()
done.append(1)
if cuda:
    torch.cuda.synchronize()
    print(json.dumps({"peak_rss_mb": torch.cuda.max_memory_allocated() / 2 ** 20, "baseline_rss_mb": 0.0}))
else:
    time.sleep(0.01)
    print(json.dumps({"peak_rss_mb": max(peak[0], rss_mb()), "baseline_rss_mb": base}))
"""


def profile_step(config: Dict, batch: int, top: int = 10) -> List[Dict]:
    """Where a vlmkit training step spends its time (torch.profiler, self time by op:
    CPU time on the CPU, kernel time on CUDA)."""
    from torch.profiler import ProfilerActivity, profile
    model, _, full = pair(config)
    images, ids, labels = batch_for(full, batch)
    opt = vlmkit.FusedAdamW(model.parameters(), lr=1e-4)
    step = training_step(model, lambda: vlmkit_loss(model, full, images, ids, labels), opt)
    step()
    cuda = DEVICE.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(3):
            step()
        sync()

    def self_us(e) -> float:
        if not cuda:
            return e.self_cpu_time_total
        return getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0.0)
    events = sorted(prof.key_averages(), key=self_us, reverse=True)
    total = sum(self_us(e) for e in events) or 1
    return [{"op": e.key, "share": self_us(e) / total, "ms_per_step": self_us(e) / 3e3} for e in events[:top]]


def with_checkpointing(config: Dict) -> Dict:
    """The same model with activation checkpointing in every encoder and the decoder."""
    out = json.loads(json.dumps(config))
    for part in ("image_encoder", "text_encoder", "decoder"):
        if part in out and out[part].get("type", "vit") in ("vit", "transformer"):
            out[part]["activation_checkpointing"] = True
    return out


def peak_memory(config: Dict, batch: int) -> Dict:
    """Peak RSS (on CUDA: peak allocated device memory) of 3 training steps, each
    implementation in its own process: vlmkit, the peer, and vlmkit with
    activation checkpointing."""
    out = {}
    runs = (("vlmkit", config, "vlmkit"), ("peer", config, "peer"),
            ("vlmkit_checkpointed", with_checkpointing(config), "vlmkit"))
    for name, cfg, impl in runs:
        done = subprocess.run([sys.executable, "-c", MEMORY_PROBE, json.dumps(cfg), impl, str(batch), "3", str(DEVICE)],
                              capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            raise RuntimeError(f"memory probe ({name}) failed: {done.stderr[-2000:]}")
        r = json.loads(done.stdout.strip().splitlines()[-1])
        out[name] = r["peak_rss_mb"] - r["baseline_rss_mb"]
    out["ratio"] = out["vlmkit"] / max(out["peer"], 1e-9)
    out["checkpointing_saving"] = 1.0 - out["vlmkit_checkpointed"] / max(out["vlmkit"], 1e-9)
    return out


ALONE_PROBE = r"""
import json, resource, statistics, sys, time, torch
import vlmkit
from vlmkit.bench import suite
config, impl, batch, steps = json.loads(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
suite.set_device(sys.argv[5])
bf16 = sys.argv[6] == "bf16"
if bf16:  # the bf16 thread policy: torch's threads on every core (as suite.train_bf16)
    import os
    vlmkit.set_num_threads(os.cpu_count() or 1, 1)
model, peer, full = suite.pair(config)
images, ids, labels = suite.batch_for(full, batch)
def precision(fn):
    def run():
        with torch.autocast(suite.DEVICE.type, dtype=torch.bfloat16, enabled=bf16):
            loss = fn()
        return loss.float()
    return run
if impl == "vlmkit":
    del peer
    opt = vlmkit.FusedAdamW(model.parameters(), lr=1e-4)
    step = suite.training_step(model, precision(lambda: suite.vlmkit_loss(model, full, images, ids, labels)), opt)
else:
    del model
    opt = torch.optim.AdamW(peer.parameters(), lr=1e-4)
    step = suite.training_step(peer, precision(lambda: peer(images, ids, labels)[1]), opt)
times, faults = [], []
for i in range(steps + 3):
    f0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
    step()
    suite.sync()
    t1, f1 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    if i >= 3:
        times.append(t1 - t0)
        faults.append(f1 - f0)
print(json.dumps({"step_s": statistics.median(times), "faults_per_step": statistics.mean(faults)}))
"""


def train_alone(config: Dict, batch: int, steps: int, rounds: int, precision: str = "fp32") -> Dict:
    """The training step as a user runs it: each side alone in a fresh process, the
    processes alternated (vlmkit, the peer, the peer with vlmkit's heap policy) for `rounds`
    rounds, medians of the per-process median step times. In one process the two sides'
    allocations shape each other's heap, and the page faults a step takes differ from
    those of a real run: 9,800 per fp32 step of the small VLM alone under glibc's own
    settings, none interleaved (docs/benchmarks.md, "Page faults of a training step").
    The peer runs twice: with glibc's defaults, as plain PyTorch runs, and with vlmkit's
    heap policy (VLMKIT_MALLOC unset), which it gets when it imports vlmkit. precision
    "bf16": both sides under bf16 autocast with torch's threads on every core."""
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"train_alone: precision must be 'fp32' or 'bf16', got {precision!r}")
    arms = {"vlmkit": ("vlmkit", {}), "peer": ("peer", {"VLMKIT_MALLOC": "system"}),
            "peer_tuned_heap": ("peer", {})}
    got = {name: {"step_s": [], "faults_per_step": []} for name in arms}
    for _ in range(rounds):
        for name, (impl, env) in arms.items():
            environ = {k: v for k, v in os.environ.items() if k != "VLMKIT_MALLOC"}
            environ.update(env)
            done = subprocess.run([sys.executable, "-c", ALONE_PROBE, json.dumps(config), impl, str(batch), str(steps),
                                   str(DEVICE), precision], capture_output=True, text=True, timeout=600, env=environ)
            if done.returncode != 0:
                raise RuntimeError(f"training-step probe ({name}) failed: {done.stderr[-2000:]}")
            r = json.loads(done.stdout.strip().splitlines()[-1])
            for k in got[name]:
                got[name][k].append(r[k])
    out = {name: {k: statistics.median(v) for k, v in d.items()} for name, d in got.items()}
    out["batch"], out["steps"], out["rounds"], out["precision"] = batch, steps, rounds, precision
    out["ratio"] = out["peer"]["step_s"] / out["vlmkit"]["step_s"]
    out["ratio_same_heap"] = out["peer_tuned_heap"]["step_s"] / out["vlmkit"]["step_s"]
    return out


def checkpointing_cost(config: Dict, batch: int, repeats: int) -> Dict:
    """Training-step time with activation checkpointing over without (same weights)."""
    torch.manual_seed(0)
    plain = vlmkit.build_model(config)
    ckpt = vlmkit.build_model(with_checkpointing(plain.config))
    ckpt.load_state_dict(plain.state_dict())
    plain, ckpt = plain.to(DEVICE), ckpt.to(DEVICE)
    full = plain.config
    images, ids, labels = batch_for(full, batch)
    steps = {name: training_step(m, (lambda m=m: vlmkit_loss(m, full, images, ids, labels)),
                                 torch.optim.AdamW(m.parameters(), lr=1e-4))
             for name, m in (("plain", plain), ("checkpointed", ckpt))}
    t = interleaved(steps, repeats)
    return {"train_s": t, "time_ratio": t["checkpointed"] / t["plain"]}


def scaling(config: Dict, quick: bool, repeats: int) -> Dict:
    curves = {"image_size": [], "text_len": [], "batch": []}
    sizes = (32, 64, 128) if quick else (32, 64, 128, 256)
    for s in sizes:
        c = copy.deepcopy(config)
        c["image_encoder"]["image_size"] = s
        r = train_and_forward(c, 8, repeats)
        curves["image_size"].append({"x": s, **{k: r["train_s"][k] for k in ("vlmkit", "peer")}})
    for t in ((16, 64, 256) if quick else (16, 64, 128, 256, 512)):
        c = copy.deepcopy(config)
        c["decoder"]["max_len"] = max(c["decoder"]["max_len"], t + 64)
        r = train_and_forward(c, 8, repeats, text_len=t)
        curves["text_len"].append({"x": t, **{k: r["train_s"][k] for k in ("vlmkit", "peer")}})
    for b in ((1, 8, 32) if quick else (1, 4, 16, 32, 64)):
        r = train_and_forward(config, b, repeats)
        curves["batch"].append({"x": b, **{k: r["train_s"][k] for k in ("vlmkit", "peer")}})
    return curves


def plot_scaling(curves: Dict, out_dir: str) -> List[str]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    paths = []
    labels = {"image_size": "image resolution (px)", "text_len": "text length (tokens)", "batch": "batch size"}
    for key, points in curves.items():
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for impl in ("vlmkit", "peer"):
            ax.plot([p["x"] for p in points], [1e3 * p[impl] for p in points], marker="o",
                    label="vlmkit" if impl == "vlmkit" else "PyTorch peer")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(labels[key])
        ax.set_ylabel("training step (ms)")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = os.path.join(out_dir, f"scaling_{key}.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def loader(quick: bool) -> Dict:
    args = [sys.executable, "-m", "vlmkit.bench.loader", "--json"]
    if quick:
        args += ["--images", "200"]
    done = subprocess.run(args, capture_output=True, text=True, timeout=1200)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed"}
    return json.loads(done.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------ report


def gemm_sources(gemm: Dict) -> str:
    """Which library set the fp32 peak, beside the other one's figure."""
    parts = [f"{label} {gemm[key]['gflops']:.1f}" for key, label in (("torch_mm", "torch.mm"), ("onednn", "oneDNN sgemm"))
             if key in gemm]
    return f"{gemm.get('source', 'torch.mm')}; " + ", ".join(parts) if parts else gemm.get("source", "torch.mm")


def markdown(results: Dict) -> str:
    m = results["machine"]
    on = f" on {m['device']}" if m.get("device", "cpu") != "cpu" else ""
    lines = [f"# vlmkit benchmark ({'quick' if results['quick'] else 'full'}){on}", "",
             f"Machine: {m['cpu']}, {m['cores']} cores; torch {m['torch']} ({m['threads']}); "
             f"fp32 GEMM peak{on} {results['gemm']['gflops']:.1f} GFLOP/s ({gemm_sources(results['gemm'])}). "
             "Ratios are vlmkit / PyTorch peer "
             "throughput (> 1: vlmkit faster), medians of interleaved runs.", "",
             "## Training step (forward + backward + AdamW) and forward", "",
             "| model | batch | params (M) | train samples/s vlmkit | peer | ratio | forward ratio | "
             "train GFLOP/s vlmkit | % of GEMM peak |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in results["training"].items():
        gflops = r["train_flops"] / r["train_s"]["vlmkit"] / 1e9
        lines.append(f"| {name} | {r['batch']} | {r['params_m']:.2f} | {r['train_samples_per_s']['vlmkit']:.1f} | "
                     f"{r['train_samples_per_s']['peer']:.1f} | {r['train_ratio']:.2f} | {r['forward_ratio']:.2f} | "
                     f"{gflops:.1f} | {100 * gflops / results['gemm']['gflops']:.0f}% |")
    lines += ["", "## Generation (greedy, default small encoder-decoder)", "",
              "| batch | KV cache | ms/token vlmkit | peer | tokens/s vlmkit | peer | ratio |",
              "|---:|---|---:|---:|---:|---:|---:|"]
    for b, r in results["generation"].items():
        for mode in ("cache", "no_cache"):
            g = r[mode]
            lines.append(f"| {b} | {'yes' if mode == 'cache' else 'no'} | {g['ms_per_token']['vlmkit']:.2f} | "
                         f"{g['ms_per_token']['peer']:.2f} | {g['tokens_per_s']['vlmkit']:.0f} | "
                         f"{g['tokens_per_s']['peer']:.0f} | {g['ratio']:.2f} |")
    bf16 = results.get("bf16")
    if bf16:
        g16 = results.get("gemm_bf16", {}).get("gflops", 0.0)
        lines += ["", "## Training in bf16 (small VLM of make train; autocast on both sides, torch threads on every core)",
                  "", f"bf16 GEMM peak {g16:.1f} GFLOP/s (torch.mm{'' if on else ', oneDNN'}) beside the fp32 peak "
                  f"{results['gemm']['gflops']:.1f} GFLOP/s ({gemm_sources(results['gemm'])}).", "",
                  "| batch | vlmkit bf16 samples/s | peer bf16 (torch.autocast) | ratio | vlmkit fp32 | bf16 / fp32 |",
                  "|---:|---:|---:|---:|---:|---:|"]
        for b, r in bf16.items():
            sps = r["train_samples_per_s"]
            lines.append(f"| {b} | {sps['vlmkit']:.1f} | {sps['peer']:.1f} | {r['ratio']:.2f} | "
                         f"{sps['vlmkit_fp32']:.1f} | {r['speedup_over_fp32']:.2f} |")
    rb = results.get("real_batches")
    if rb:
        sps, pad = rb["samples_per_s"], rb["padding"]
        lines += ["", f"## Real batches of `vlmkit train`'s default data (batch 32, {rb['precision']}, loader included)",
                  "", "The same examples in every case; the peer trains on the padded batches in a plain torch loop.",
                  "", "| batching | samples/s | padded text positions | vs padded |", "|---|---:|---:|---:|",
                  f"| one example per row, padded to the longest | {sps['padded']:.1f} | {100 * pad['padded']:.0f}% | 1.00 |",
                  f"| length-grouped (group_by_length) | {sps['grouped']:.1f} | {100 * pad['grouped']:.0f}% | "
                  f"{rb['grouped_over_padded']:.2f} |",
                  f"| packed (pack_to = max_len, the default) | {sps['packed']:.1f} | {100 * pad['packed']:.0f}% | "
                  f"{rb['packed_over_padded']:.2f} |",
                  f"| peer, padded | {sps['peer']:.1f} | {100 * pad['padded']:.0f}% | |"]
    alone = results.get("alone")
    if alone:
        lines += ["", "## Training step alone (small VLM of make train; each side in its own process)", "",
                  "Processes alternated, medians; the peer once with glibc's own heap settings (plain PyTorch) and "
                  "once with vlmkit's heap policy (what it gets when it imports vlmkit).", "",
                  "| precision, batch | vlmkit ms/step | faults/step | peer ms/step | faults/step | ratio | "
                  "peer, vlmkit's heap, ms/step | ratio |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for b, r in alone.items():
            lines.append(f"| {b} | {1e3 * r['vlmkit']['step_s']:.1f} | {r['vlmkit']['faults_per_step']:.0f} | "
                         f"{1e3 * r['peer']['step_s']:.1f} | {r['peer']['faults_per_step']:.0f} | {r['ratio']:.2f} | "
                         f"{1e3 * r['peer_tuned_heap']['step_s']:.1f} | {r['ratio_same_heap']:.2f} |")
    mem = results.get("memory")
    if mem:
        what = "peak allocated device memory" if on else "RSS above the imports"
        lines += ["", f"## Peak memory of training ({what}, batch 32)", "",
                  f"vlmkit {mem['vlmkit']:.0f} MB, peer {mem['peer']:.0f} MB (vlmkit / peer {mem['ratio']:.2f})."]
        if "vlmkit_checkpointed" in mem:
            cost = results.get("checkpointing", {}).get("time_ratio")
            lines += ["", f"With activation checkpointing (every encoder and decoder block, and the ViT's conv stem): "
                          f"{mem['vlmkit_checkpointed']:.0f} MB, {100 * mem['checkpointing_saving']:.0f}% less"
                      + (f", at {cost:.2f}x the step time." if cost else ".")]
    prof = results.get("profile")
    if prof:
        lines += ["", "## Where a training step goes (small VLM of make train, batch 32, torch.profiler)", "",
                  ("Self kernel time by op." if on else
                   "Self CPU time by ATen op; the peer runs the same ops, which is why the ratios sit near 1."), "",
                  "| op | share | ms per step |", "|---|---:|---:|"]
        lines += [f"| {p['op']} | {100 * p['share']:.1f}% | {p['ms_per_step']:.2f} |" for p in prof]
    ld = results.get("loader")
    if ld and "error" not in ld:
        lines += ["", "## Image loader (decode, resize to 224, normalise)", "",
                  "Each ratio pairs the same decode; start-up runs in an untimed first epoch on both sides.", "",
                  "| pipeline | images/s | vs the same decode in PIL | pixels vs PIL full decode (mean / p99 / max, 1/255) |",
                  "|---|---:|---:|---|",
                  f"| vlmkit Loader (JPEG draft decode, default) | {ld['vlmkit_images_per_s']:.0f} | "
                  f"{ld['ratio']:.2f}x | {ld['mean_abs_diff_255']:.2f} / {ld['p99_abs_diff_255']:.2f} / "
                  f"{ld['max_abs_diff_255']:.2f} |",
                  f"| PIL draft decode (Image.draft) + torchvision DataLoader (2 workers) | "
                  f"{ld['peer_draft_images_per_s']:.0f} | 1.00x | |",
                  f"| vlmkit Loader, jpeg_draft=False | {ld['vlmkit_exact_images_per_s']:.0f} | "
                  f"{ld['ratio_exact']:.2f}x | {ld['exact_mean_abs_diff_255']:.2f} / {ld['exact_p99_abs_diff_255']:.2f} / "
                  f"{ld['exact_max_abs_diff_255']:.2f} |",
                  f"| PIL full decode + torchvision DataLoader (2 workers) | {ld['peer_images_per_s']:.0f} | 1.00x | |"]
        if "decode_bound_ratio" in ld:
            lines += ["", f"PIL's draft decode alone (libjpeg-turbo, as vlmkit's): {ld['pil_decode_ms']:.3f} ms per "
                      f"image on one core, so a loader whose every step after the decode were free would reach "
                      f"at most {ld['decode_bound_ratio']:.2f}x the peer."]
    if results.get("plots"):
        lines += ["", "## Scaling", ""] + [f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in results["plots"]]
    targets = results.get("targets", {})
    if targets:
        lines += ["", "## Targets", "", "| target | measured | met |", "|---|---:|---|"]
        for k, v in targets.items():
            lines.append(f"| {k} | {v['value']:.2f} (need {v['need']}) | {'yes' if v['met'] else 'no'} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer configurations and repeats (< 5 minutes)")
    parser.add_argument("--out", default="results/bench")
    parser.add_argument("--repeats", type=int, default=0)
    parser.add_argument("--skip-loader", action="store_true")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]: where both sides run")
    args = parser.parse_args(argv)
    set_device(args.device)
    cuda = DEVICE.type == "cuda"
    quick = args.quick
    repeats = args.repeats or (5 if quick else 9)
    os.makedirs(args.out, exist_ok=True)
    info = vlmkit.thread_info()
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")),
               platform.processor())
    results = {"quick": quick, "repeats": repeats,
               "machine": {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__,
                           "device": torch.cuda.get_device_name(DEVICE) if cuda else "cpu",
                           "threads": f"torch {info['torch_threads']}, {info['blas']} {info['blas_threads']}"}}
    start = time.time()
    results["gemm"] = gemm_peak(quick)
    print(f"fp32 GEMM peak: {results['gemm']['gflops']:.1f} GFLOP/s ({gemm_sources(results['gemm'])})", flush=True)

    configs = {"encoder_decoder (small VLM of make train)": SMALL_VLM,
               "encoder_decoder (default)": vlmkit.default_config("encoder_decoder"),
               "two_tower (default)": vlmkit.default_config("two_tower"),
               "two_leg (default)": vlmkit.default_config("two_leg")}
    for proj in vlmkit.PROJECTORS:
        for fusion in (("concat",) if quick else ("concat", "cross_attention")):
            c = vlmkit.default_config("encoder_decoder")
            c["projector"] = {"type": proj}
            c["fusion"] = fusion
            if fusion == "cross_attention":
                c["decoder"]["cross_attention_every"] = 2
            configs[f"encoder_decoder {proj} + {fusion}"] = c
    results["training"] = {}
    batches = {"encoder_decoder (small VLM of make train)": (32, 1)}
    for name, config in configs.items():
        for b in batches.get(name, (32,)):
            key = name if b == 32 else f"{name}, batch {b}"
            results["training"][key] = r = train_and_forward(config, b, repeats)
            print(f"train {key}: vlmkit {r['train_samples_per_s']['vlmkit']:.1f} samples/s, "
                  f"peer {r['train_samples_per_s']['peer']:.1f}, ratio {r['train_ratio']:.2f}", flush=True)

    results["gemm_bf16"] = gemm_peak_bf16(quick)
    results["bf16"] = {str(b): train_bf16(SMALL_VLM, b, repeats) for b in (32, 1)}
    for b, r in results["bf16"].items():
        print(f"train bf16 batch {b}: vlmkit {r['train_samples_per_s']['vlmkit']:.1f} samples/s, peer under "
              f"torch.autocast {r['train_samples_per_s']['peer']:.1f}, ratio {r['ratio']:.2f}, "
              f"x{r['speedup_over_fp32']:.2f} vlmkit fp32", flush=True)

    if not cuda:  # the Loader is the CPU pipeline
        results["real_batches"] = rb = real_batches(quick, max(2, repeats // 2))
        print(f"real batches ({rb['precision']}): packed {rb['samples_per_s']['packed']:.1f} samples/s, padded "
              f"{rb['samples_per_s']['padded']:.1f}, grouped {rb['samples_per_s']['grouped']:.1f}, peer padded "
              f"{rb['samples_per_s']['peer']:.1f}", flush=True)

    results["generation"] = {}
    for b in (1, 8):
        results["generation"][str(b)] = g = generation(SMALL_VLM, b, 24 if quick else 48, max(3, repeats // 2))
        print(f"generate batch {b}: cache ratio {g['cache']['ratio']:.2f}, no-cache ratio {g['no_cache']['ratio']:.2f}",
              flush=True)

    results["memory"] = peak_memory(SMALL_VLM, 32)
    results["checkpointing"] = checkpointing_cost(SMALL_VLM, 32, repeats)
    print(f"peak {'device memory' if cuda else 'RSS'}: vlmkit {results['memory']['vlmkit']:.0f} MB, peer {results['memory']['peer']:.0f} MB, "
          f"vlmkit with activation checkpointing {results['memory']['vlmkit_checkpointed']:.0f} MB "
          f"(step time x{results['checkpointing']['time_ratio']:.2f})", flush=True)

    if not cuda:  # page faults are a host-heap matter
        results["alone"] = {f"{p}, batch {b}": train_alone(SMALL_VLM, b, 8 if b == 32 else 60, 3, p)
                            for p in ("fp32", "bf16") for b in (32, 1)}
        for b, r in results["alone"].items():
            print(f"train alone, {b}: vlmkit {1e3 * r['vlmkit']['step_s']:.1f} ms "
                  f"({r['vlmkit']['faults_per_step']:.0f} faults/step), peer {1e3 * r['peer']['step_s']:.1f} ms "
                  f"({r['peer']['faults_per_step']:.0f}), ratio {r['ratio']:.2f}; peer with vlmkit's heap policy "
                  f"{1e3 * r['peer_tuned_heap']['step_s']:.1f} ms, ratio {r['ratio_same_heap']:.2f}", flush=True)

    results["profile"] = profile_step(SMALL_VLM, 32)
    results["scaling"] = scaling(SMALL_VLM, quick, max(3, repeats // 2))
    results["plots"] = plot_scaling(results["scaling"], args.out)
    if not args.skip_loader and not cuda:
        results["loader"] = loader(quick)

    small = results["training"]["encoder_decoder (small VLM of make train)"]
    small_b1 = results["training"]["encoder_decoder (small VLM of make train), batch 1"]
    gflops = small["train_flops"] / small["train_s"]["vlmkit"] / 1e9
    results["targets"] = {
        "training step, batch 32, vlmkit / peer": {"value": small["train_ratio"], "need": ">= 1.3"},
        "training step, batch 1, vlmkit / peer": {"value": small_b1["train_ratio"], "need": ">= 1.5"},
        "generation batch 1 with cache, vlmkit / peer": {"value": results["generation"]["1"]["cache"]["ratio"],
                                                         "need": ">= 2.0"},
        "training GFLOP/s / GEMM peak": {"value": gflops / results["gemm"]["gflops"], "need": ">= 0.60"},
        "peak training memory, vlmkit / peer": {"value": results["memory"]["ratio"], "need": "<= 1.0"},
        "training step in bf16, batch 32, vlmkit / peer under torch.autocast": {
            "value": results["bf16"]["32"]["ratio"], "need": ">= 1.3"},
        "peak training memory saved by activation checkpointing": {
            "value": results["memory"]["checkpointing_saving"], "need": ">= 0.40"},
    }
    if "alone" in results:  # the same targets, as a user runs the step
        results["targets"]["training step alone, batch 32, vlmkit / peer (own processes)"] = {
            "value": results["alone"]["fp32, batch 32"]["ratio"], "need": ">= 1.3"}
        results["targets"]["training step alone, batch 1, vlmkit / peer (own processes)"] = {
            "value": results["alone"]["fp32, batch 1"]["ratio"], "need": ">= 1.5"}
        results["targets"]["training step alone in bf16, batch 32, vlmkit / peer under torch.autocast"] = {
            "value": results["alone"]["bf16, batch 32"]["ratio"], "need": ">= 1.3"}
    if "real_batches" in results:  # a target of these 2 cores
        results["targets"]["training throughput on real batches (samples/s, default data, packed)"] = {
            "value": results["real_batches"]["samples_per_s"]["packed"], "need": ">= 100"}
    ld = results.get("loader", {})
    if "ratio" in ld:
        results["targets"]["loader images/s, vlmkit / PIL + torchvision (both draft-decoding)"] = {
            "value": ld["ratio"], "need": ">= 3.0"}
        results["targets"]["loader mean pixel difference (1/255)"] = {"value": ld["mean_abs_diff_255"],
                                                                       "need": "<= 1.0"}
    for v in results["targets"].values():
        need = float(v["need"].split()[1])
        v["met"] = v["value"] >= need if v["need"].startswith(">=") else v["value"] <= need
    results["seconds"] = time.time() - start
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    report = markdown(results)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(report)
    print(report)
    print(f"wrote {args.out}/results.json, results.md and plots in {results['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
