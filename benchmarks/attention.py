"""vlmkit's fused CPU attention beside ATen's matmul-softmax-matmul, one process.

    .venv/bin/python benchmarks/attention.py [--rounds 3] [--calls 20] [--steps 8] [--json out.json]

Both sides compute softmax(q k^T * scale + bias) v with an additive bias of the
kind the models build (none, causal, or packed rows: causal inside 3-4 examples
per row, nothing across them, padding at the end), forward alone and forward +
backward (gradients of q, k and v). ATen's side is what MultiheadAttention runs
with set_attention_kernel("aten") on torch < 2: q scaled, q k^T, bias added,
softmax, times v. Threads as `vlmkit train` sets them for the precision (bf16:
torch on every core; fp32: torch 1, OpenBLAS on every core). Medians of the
rounds; the ratio is ATen's time over the fused kernel's.

Then the whole step: `vlmkit train`'s model on packed real batches of its data
(the Trainer, batch 32), in float32 and in bf16, with set_attention_kernel("aten")
and "auto" interleaved (samples/s, medians of the rounds).
"""
import argparse
import json
import os
import statistics
import time

import torch

import vlmkit


def packed_bias(b, t, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    seg = torch.zeros(b, t, dtype=torch.long)
    for row in range(b):
        for cut in sorted(torch.randint(1, t - 8, (3,), generator=g).tolist()):
            seg[row, cut:] += 1
        seg[row, t - 8:] = -1
    allowed = (seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] >= 0) & torch.ones(t, t, dtype=torch.bool).tril()
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


def bias_for(mask, b, t, dtype):
    if mask == "none":
        return None
    if mask == "causal":
        allowed = torch.ones(t, t, dtype=torch.bool).tril()[None]
        return torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)[:, None]
    return packed_bias(b, t, dtype)


def aten(q, k, v, bias):
    scores = (q * (q.shape[-1] ** -0.5)) @ k.transpose(-2, -1)
    if bias is not None:
        scores = scores + bias
    return scores.softmax(-1) @ v


def fused(q, k, v, bias):
    return vlmkit.fused_attention(q, k, v, bias)


def timed(fn, q, k, v, bias, backward, calls):
    grad = torch.randn_like(q)
    for _ in range(2):  # warm up
        out = fn(q, k, v, bias)
        if backward:
            torch.autograd.grad(out, (q, k, v), grad)
    start = time.perf_counter()
    for _ in range(calls):
        out = fn(q, k, v, bias)
        if backward:
            torch.autograd.grad(out, (q, k, v), grad)
    return (time.perf_counter() - start) / calls * 1e3


CASES = [  # (name, B, H, T, Dh, mask)
    ("packed rows of make train (bf16 shape)", 13, 4, 226, 32, "packed"),
    ("causal decoder, T 256", 8, 4, 256, 32, "causal"),
    ("encoder, no mask, T 64 (ViT at 64 px)", 32, 4, 64, 32, "none"),
    ("encoder, no mask, T 196", 8, 4, 196, 32, "none"),
    ("long causal, T 512", 2, 4, 512, 64, "causal"),
    ("decoder, causal, T 32 (the suite's step)", 32, 4, 32, 32, "causal"),
    ("encoder, no mask, T 64, batch 1", 1, 4, 64, 32, "none"),
    ("decoder, causal, T 32, batch 1", 1, 4, 32, 32, "causal"),
]


def real_steps(precision, steps, rounds):
    import tempfile

    from vlmkit import data
    from vlmkit.train_vlm import SMALL_VLM, image_tokens_per_placeholder, write_task_manifest
    from vlmkit.trainer import Trainer

    manifest = write_task_manifest(tempfile.mkdtemp(prefix="vlmkit-attn-"), 40, 0, 64)
    model = vlmkit.build_model(SMALL_VLM)
    rates = {"aten": [], "auto": []}
    for r in range(rounds):
        for kernel in rates:
            vlmkit.set_attention_kernel(kernel)
            loader = data.Loader(manifest, batch_size=32, num_workers=2, image_size=64, seed=r, drop_last=True,
                                 pack_to=SMALL_VLM["decoder"]["max_len"],
                                 pack_image_tokens=image_tokens_per_placeholder(model, 64))
            trainer = Trainer(model, steps=steps, lr=1e-4, warmup_steps=1, log_every=10 ** 6, precision=precision)
            rates[kernel].append(trainer.fit(loader, on_log=lambda record: None)["samples_per_second"])
    vlmkit.set_attention_kernel("auto")
    return {k: statistics.median(v) for k, v in rates.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--steps", type=int, default=8, help="Trainer steps per round of the whole-step check (0: skip)")
    parser.add_argument("--json")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        if dtype == torch.bfloat16:
            vlmkit.set_num_threads(cores, 1)
        else:
            vlmkit.set_num_threads(1, cores)
        for name, b, h, t, d, mask in CASES:
            g = torch.Generator().manual_seed(0)
            q, k, v = (torch.randn(b, h, t, d, generator=g).to(dtype).requires_grad_() for _ in range(3))
            bias = bias_for(mask, b, t, dtype)
            for backward in (False, True):
                times = {"aten": [], "fused": []}
                for _ in range(args.rounds):
                    for side, fn in (("aten", aten), ("fused", fused)):
                        times[side].append(timed(fn, q, k, v, bias, backward, args.calls))
                a, f = statistics.median(times["aten"]), statistics.median(times["fused"])
                rows.append({"case": name, "dtype": str(dtype).split(".")[1], "shape": [b, h, t, d], "mask": mask,
                             "pass": "fwd+bwd" if backward else "fwd", "aten_ms": round(a, 2), "fused_ms": round(f, 2),
                             "ratio": round(a / f, 2)})
                print(f"{rows[-1]['dtype']:8} {name:42} {rows[-1]['pass']:7} aten {a:7.2f} ms  fused {f:7.2f} ms  "
                      f"{a / f:5.2f}x", flush=True)
    steps = {}
    if args.steps > 0:
        for precision in ("fp32", "bf16"):
            if precision == "bf16":
                vlmkit.set_num_threads(cores, 1)
            else:
                vlmkit.set_num_threads(1, cores)
            rates = real_steps(precision, args.steps, args.rounds)
            steps[precision] = {**rates, "ratio": round(rates["auto"] / rates["aten"], 3)}
            print(f"{precision:8} make train's packed step: aten {rates['aten']:.1f}  auto {rates['auto']:.1f} "
                  f"samples/s  {rates['auto'] / rates['aten']:.2f}x", flush=True)
    vlmkit.apply_default_threads()
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"kernel": rows, "train_step": steps}, fh, indent=1)


if __name__ == "__main__":
    main()
