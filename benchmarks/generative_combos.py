"""Parameter count and forward / forward+backward time of the default small
configuration for every (architecture x projector x fusion) combination.

    .venv/bin/python benchmarks/generative_combos.py [--batch 8] [--repeats 5]

Prints a Markdown table. Medians of `repeats` runs after one warm-up, with
vlmkit's thread policy (1 torch thread, OpenBLAS on every core).
"""
import argparse
import itertools
import statistics
import time

import torch

import vlmkit
from vlmkit import text


def median_seconds(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    info = vlmkit.thread_info()
    print(f"threads: torch {info['torch_threads']}, {info['blas']} {info['blas_threads']}; batch {args.batch}")
    print("| architecture | projector | fusion | params (M) | sequence | forward ms | fwd+bwd ms |")
    print("|---|---|---|---:|---:|---:|---:|")
    prompts = ["<image>Describe the image in one sentence."] * args.batch
    answers = ["a red circle above a blue square"] * args.batch
    ids, labels, mask = text.training_batch(prompts, answers)
    for arch, projector, fusion in itertools.product(
            ["encoder_decoder", "encoder_text_decoder"],
            vlmkit.PROJECTORS, ["concat", "cross_attention"]):
        torch.manual_seed(0)
        model = vlmkit.build_model({"architecture": arch, "projector": {"type": projector}, "fusion": fusion})
        images = torch.rand(args.batch, 3, 64, 64)
        if arch == "encoder_decoder":
            call = lambda: model(images, ids, mask, labels)
        else:
            cids, cmask = text.encode_batch(["a picture with shapes"] * args.batch, 64)
            call = lambda: model(images, cids, ids, cmask, mask, labels)
        params = sum(p.numel() for p in model.parameters()) / 1e6
        with torch.no_grad():
            seq = call().logits.shape[1]
            fwd = median_seconds(call, args.repeats)

        def step():
            model.zero_grad(set_to_none=True)
            call().loss.backward()

        both = median_seconds(step, args.repeats)
        print(f"| {arch} | {projector} | {fusion} | {params:.2f} | {seq} | {fwd * 1e3:.0f} | {both * 1e3:.0f} |",
              flush=True)


if __name__ == "__main__":
    main()
