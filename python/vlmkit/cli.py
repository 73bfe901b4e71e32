"""The `vlmkit` command."""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional


def _train(args: argparse.Namespace) -> int:
    from . import thread_info
    from .train_two_tower import TwoTowerRun, train

    if args.architecture != "two_tower":
        print(f"vlmkit train: architecture {args.architecture!r} cannot be trained by this "
              f"version yet; available: 'two_tower'", file=sys.stderr)
        return 2
    info = thread_info()
    print(f"threads: torch {info['torch_threads']}, {info['blas']} {info['blas_threads']}")
    run = TwoTowerRun(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    metrics = train(run, out_dir=args.output)
    print("\nmetric                          value")
    for key, value in metrics.items():
        print(f"{key:30s}  {value:10.4f}")
    print(f"\ncheckpoint: {args.output}/model.pt (config: {args.output}/config.json)")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="vlmkit", description="Vision-language models on LibTorch.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train a small model on the built-in data")
    p.add_argument("--architecture", default="two_tower")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=20)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default="runs/two_tower")
    p.set_defaults(func=_train)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
