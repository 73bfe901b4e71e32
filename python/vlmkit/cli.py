"""The `vlmkit` command."""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional


def _train(args: argparse.Namespace) -> int:
    from . import thread_info

    info = thread_info()
    print(f"threads: torch {info['torch_threads']}, {info['blas']} {info['blas_threads']}")
    if args.architecture == "two_tower":
        from .train_two_tower import TwoTowerRun, train

        run = TwoTowerRun(steps=args.steps or 1000, batch_size=args.batch_size or 20, lr=args.lr or 2e-3,
                          seed=args.seed)
        metrics = train(run, out_dir=args.output or "runs/two_tower")
        output = args.output or "runs/two_tower"
    elif args.architecture == "encoder_decoder":
        from .train_vlm import VlmRun, train

        run = VlmRun(steps=args.steps or VlmRun.steps, batch_size=args.batch_size or VlmRun.batch_size,
                     lr=args.lr or VlmRun.lr, seed=args.seed, train_scenes=args.scenes)
        output = args.output or "runs/vlm"
        metrics = train(run, out_dir=output)
    else:
        print(f"vlmkit train: architecture {args.architecture!r} cannot be trained by this version yet; "
              f"available: 'encoder_decoder', 'two_tower'", file=sys.stderr)
        return 2
    print("\nmetric                          value")
    for key, value in metrics.items():
        print(f"{key:30s}  {value:10.4f}")
    print(f"\ncheckpoint: {output}/model.pt (config: {output}/config.json, log: {output}/metrics.jsonl)")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="vlmkit", description="Vision-language models on LibTorch.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train a small model on the built-in data")
    p.add_argument("--architecture", default="encoder_decoder", help="encoder_decoder (default) or two_tower")
    p.add_argument("--steps", type=int, default=0, help="optimizer steps (0: the architecture's default)")
    p.add_argument("--batch-size", type=int, default=0)
    p.add_argument("--lr", type=float, default=0.0)
    p.add_argument("--scenes", type=int, default=3000, help="synthetic training scenes (encoder_decoder)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default="")
    p.set_defaults(func=_train)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
