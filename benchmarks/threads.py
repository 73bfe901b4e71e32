"""Training speed of `vlmkit train`'s model under each thread policy (torch
intra-op threads x OpenBLAS threads): the figures behind the README's Threads
section.

    .venv/bin/python benchmarks/threads.py [--rounds 3] [--steps 6] [--batch 32]

Each setting runs in its own process (thread pools are fixed once started), the
settings are interleaved round by round, and the table shows medians and each
setting's speed relative to vlmkit's default policy. The last setting gives both
pools every core with both told not to spin when idle (OMP_WAIT_POLICY=PASSIVE for
torch's OpenMP team; OPENBLAS_THREAD_TIMEOUT=4 for OpenBLAS, whose idle worker
otherwise spins after each GEMM, through a 20 ms pause at least): oversubscription
without the spinning.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys

CHILD = r"""
import json, sys, time, torch
import vlmkit
from vlmkit.bench import suite
from vlmkit.train_vlm import SMALL_VLM
steps, batch = int(sys.argv[1]), int(sys.argv[2])
torch.manual_seed(0)
model = vlmkit.build_model(SMALL_VLM).train()
images, ids, labels = suite.batch_for(model.config, batch, 48)
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
def step():
    opt.zero_grad(set_to_none=True)
    model(images, ids, None, labels).loss.backward()
    opt.step()
for _ in range(2):
    step()
start = time.perf_counter()
for _ in range(steps):
    step()
info = vlmkit.thread_info()
print(json.dumps({"samples_per_s": steps * batch / (time.perf_counter() - start),
                  "torch_threads": info["torch_threads"], "blas_threads": info["blas_threads"]}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    passive = {"OMP_WAIT_POLICY": "PASSIVE", "OPENBLAS_THREAD_TIMEOUT": "4"}
    settings = {"default": (None, {}), "torch 1, BLAS 1": ((1, 1), {}), f"torch 1, BLAS {cores}": ((1, cores), {}),
                f"torch {cores}, BLAS 1": ((cores, 1), {}), f"torch {cores}, BLAS {cores}": ((cores, cores), {}),
                f"torch {cores}, BLAS {cores}, both passive": ((cores, cores), passive)}
    runs = {name: [] for name in settings}
    seen = {}
    for _ in range(args.rounds):
        for name, (threads, extra) in settings.items():
            env = dict(os.environ)
            for key in ("VLMKIT_TORCH_THREADS", "VLMKIT_BLAS_THREADS", "VLMKIT_KEEP_THREADS", "OMP_NUM_THREADS",
                        *passive):
                env.pop(key, None)
            env.update(extra)
            if threads:
                env["VLMKIT_TORCH_THREADS"], env["VLMKIT_BLAS_THREADS"] = map(str, threads)
            out = subprocess.run([sys.executable, "-c", CHILD, str(args.steps), str(args.batch)], env=env,
                                 capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            runs[name].append(r["samples_per_s"])
            seen[name] = (r["torch_threads"], r["blas_threads"])
    base = statistics.median(runs["default"])
    print(f"`vlmkit train`'s model, batch {args.batch}, 48 text tokens, AdamW; {cores} cores; "
          f"medians of {args.rounds} interleaved rounds of {args.steps} steps")
    print("\n| threads (torch, BLAS) | samples/s | vs default |\n|---|---:|---:|")
    table = {}
    for name in settings:
        med = statistics.median(runs[name])
        label = name if name != "default" else f"default (torch {seen[name][0]}, BLAS {seen[name][1]})"
        table[label] = {"samples_per_s": med, "vs_default": med / base, "runs": runs[name]}
        print(f"| {label} | {med:.1f} | {med / base:.2f}x |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(table, f, indent=1)


if __name__ == "__main__":
    main()
