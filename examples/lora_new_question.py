"""LoRA fine-tune of a trained checkpoint on a kind of question it was never
asked, measured before and after on held-out scenes (docs/finetune.md).

    python examples/lora_new_question.py --base runs/vlm --out runs/lora-more-than-two

The new question is "Are there more than two shapes?" (yes / no). The fine-tune
data: that question on every training scene, plus one old task per scene as
replay, so the adapters learn the new question without unlearning the old ones.
Only the adapters train (rank 8 on every attention projection by default).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import time

import torch

from vlmkit import checkpoint, data, lora
from vlmkit.train_vlm import TEST_SEED_OFFSET, VlmRun, evaluate, scene_tasks, train

QUESTION = "Are there more than two shapes?"


def answer(sample) -> str:
    return "yes" if len(sample["objects"]) > 2 else "no"


def write_tasks(folder: str, scenes: int, seed: int, size: int) -> str:
    manifest = os.path.join(folder, "lora_tasks.jsonl")
    dataset = data.SyntheticDataset(scenes, image_size=size, seed=seed)
    dataset.write(folder)
    rng = random.Random(seed)
    with open(os.path.join(folder, "manifest.jsonl")) as f, open(manifest, "w") as out:
        for index, line in enumerate(f):
            image = json.loads(line)["image"]
            sample = dataset[index]
            out.write(json.dumps({"image": image, "kind": "more_than_two", "question": QUESTION,
                                  "answer": answer(sample)}) + "\n")
            old = rng.choice(scene_tasks(sample))  # replay
            out.write(json.dumps({"image": image, **old}) + "\n")
    return manifest


@torch.no_grad()
def new_question_accuracy(model, scenes: int, seed: int, size: int) -> dict:
    model.eval()
    dataset = data.SyntheticDataset(scenes, image_size=size, seed=seed)
    right, yes, outputs = 0, 0, {}
    for start in range(0, scenes, 16):
        part = [dataset[i] for i in range(start, min(scenes, start + 16))]
        images = torch.stack([data.preprocess(s["image"], size, "square", normalize="clip")[0] for s in part])
        for s, out in zip(part, model.generate(images, [data.chat_prompt("<image>" + QUESTION)] * len(part), 8)):
            truth = answer(s)
            right += out == truth
            yes += truth == "yes"
            outputs[out] = outputs.get(out, 0) + 1
    return {"more_than_two/exact_match": right / scenes,
            "more_than_two/baseline": max(yes, scenes - yes) / scenes,
            "more_than_two/outputs": dict(sorted(outputs.items(), key=lambda kv: -kv[1])[:5])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", default="runs/vlm")
    p.add_argument("--out", default="runs/lora-more-than-two")
    p.add_argument("--scenes", type=int, default=1000, help="fine-tune scenes")
    p.add_argument("--test-scenes", type=int, default=100)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    args = p.parse_args()
    base = checkpoint.load_model(args.base)
    size = base.config["image_encoder"]["image_size"]
    test_seed = TEST_SEED_OFFSET
    started = time.perf_counter()
    before = {"old": evaluate(base, args.test_scenes, test_seed, size),
              "new": new_question_accuracy(base, args.test_scenes, test_seed, size)}
    os.makedirs(args.out, exist_ok=True)
    manifest = write_tasks(os.path.join(args.out, "data"), args.scenes, 1, size)
    run = VlmRun(init_from=args.base, data=manifest, lora_rank=args.rank, steps=args.steps, lr=args.lr,
                 warmup=20, val_scenes=0, eval_scenes=args.test_scenes, train_scenes=args.scenes,
                 checkpoint_every=100)
    after_old = train(run, out_dir=args.out, resume=False)
    model = checkpoint.load_model(args.out)  # base + adapters, as anyone would load it
    after = {"old": after_old,  # train's own evaluation of the same test scenes, adapters on
             "new": new_question_accuracy(model, args.test_scenes, test_seed, size)}
    report = {"before": before, "after": after, "train_seconds": after_old["train_seconds"],
              "trainable": sum(p.numel() for p in lora.trainable_parameters(model)),
              "parameters": sum(p.numel() for p in model.parameters()),
              "adapter_bytes": os.path.getsize(os.path.join(args.out, "adapter", "adapter_model.safetensors")),
              "seconds": time.perf_counter() - started}
    with open(os.path.join(args.out, "lora_report.json"), "w") as f:
        json.dump(report, f, indent=2)
    keys = [k for k in before["old"] if k.endswith(("exact_match", "cer", "mean_iou", "field_accuracy", "bleu4"))]
    print(f"\n{'metric':34s} {'before':>8s} {'after':>8s}")
    for k in ["more_than_two/exact_match", "more_than_two/baseline"]:
        print(f"{k:34s} {before['new'][k]:8.3f} {after['new'][k]:8.3f}")
    for k in keys:
        print(f"{k:34s} {before['old'][k]:8.3f} {after['old'][k]:8.3f}")
    print(f"outputs before {before['new']['more_than_two/outputs']}, after {after['new']['more_than_two/outputs']}")
    print(f"trainable {report['trainable']} of {report['parameters']}; adapter file {report['adapter_bytes']} bytes; "
          f"{report['seconds']:.0f} s")


if __name__ == "__main__":
    main()
