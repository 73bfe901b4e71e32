"""Can the VLM stage of `vlmkit train` learn one task on its own?

    .venv/bin/python benchmarks/task_alone.py --task spatial [--steps 600] [--scenes 3000]
        [--pretrain-steps N] [--set decoder.depth=8] [--json out.json]

The default run trains every task at once; when a task stays at its image-blind
baseline there, this asks whether the same model and recipe learn it with nothing
else to learn. It builds the default small VLM, runs stage 1 (the image encoder on
the scenes' tags and what lies under each token, as `vlmkit train` does), then
trains projector and decoder with the encoder frozen, in bf16 with packed rows, on
the examples of one task alone (from --scenes training scenes), and scores that
task by exact match on 200 validation scenes (greedy decoding). Besides the
dataset's short-answer tasks (colour, shape, count, spatial, ocr) it has one task of
its own, "column": "Which column is the <colour> <shape> in?", answered with the
quarter of the image (0-3) that holds the object's centre: one look-up of one
object's place, the step that spatial questions, captions (objects in reading
order) and boxes all need.

It also prints how precisely an object's place can be read from the stage-1
encoder's tokens: a least-squares fit of each object's horizontal centre from the
mean of the tokens under its mask (1,500 scenes, 70% to fit, the rest held out),
beside the same fit at random initialisation.
"""
import argparse
import json
import os
import random
import sys
import time

import torch

import vlmkit
from vlmkit import Trainer, data
from vlmkit.train_vlm import (SMALL_VLM, VALIDATION_SEED_OFFSET, VlmRun, image_tokens_per_placeholder,
                              pretrain_image_encoder, scene_tasks, write_task_manifest)

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from probes import publish  # noqa: E402

SHORT_TASKS = ("colour", "shape", "count", "spatial", "ocr", "column")


def column_task(objects, size, index):
    """The diagnostic look-up: one of a scene's objects (each with "label" and "box",
    as in a sample and in manifest.jsonl), chosen by the scene's index, and its column."""
    obj = random.Random(index).choice(objects)
    x1, _, x2, _ = obj["box"]
    return {"kind": "column", "question": f"Which column is the {obj['label']} in?",
            "answer": str(min(3, int(2 * (x1 + x2) / size)))}


def tasks_of(sample, index, task):
    """The examples of kind `task` of one rendered scene."""
    size = sample["image"].shape[1]
    found = [column_task(sample["objects"], size, index)] if task == "column" else scene_tasks(sample)
    return [t for t in found if t["kind"] == task]


def write_task_examples(folder, task, seed, size):
    """folder/tasks-<task>.jsonl from the rendered scenes' manifests (not rendered again)."""
    out_path = os.path.join(folder, f"tasks-{task}.jsonl")
    with open(out_path, "w") as out:
        if task == "column":
            with open(os.path.join(folder, "manifest.jsonl")) as f:
                for i, line in enumerate(f):
                    entry = json.loads(line)
                    example = column_task(entry["objects"], size, seed * 100_000 + i)
                    out.write(json.dumps({"image": entry["image"], **example}) + "\n")
        else:
            with open(os.path.join(folder, "tasks.jsonl")) as f:
                for line in f:
                    if json.loads(line)["kind"] == task:
                        out.write(line)
    return out_path


def position_fit(model, size, seed, scenes=1500):
    """R^2 and mean absolute error (pixels) of an object's horizontal centre, fitted
    by least squares from the mean of the encoder tokens under its mask, held out."""
    dataset = data.SyntheticDataset(scenes, image_size=size, seed=seed)
    feats, centres = [], []
    with torch.no_grad():
        for i in range(len(dataset)):
            sample = dataset[i]
            pixels = data.preprocess(sample["image"], size, "square", normalize="clip")[0]
            tokens = model.image_encoder(pixels[None]).tokens[0]
            grid = int(tokens.shape[0] ** 0.5)
            for n, obj in enumerate(sample["objects"]):
                weight = torch.nn.functional.adaptive_avg_pool2d(sample["masks"][n][None].float(), grid).flatten()
                feats.append((weight[:, None] * tokens).sum(0) / weight.sum().clamp_min(1e-6))
                centres.append((obj["box"][0] + obj["box"][2]) / 2)
    x = torch.cat([torch.stack(feats), torch.ones(len(feats), 1)], 1).double()
    y = torch.tensor(centres, dtype=torch.double)
    cut = int(0.7 * len(y))
    w = torch.linalg.lstsq(x[:cut], y[:cut, None]).solution
    pred = (x[cut:] @ w).squeeze(1)
    r2 = 1 - ((pred - y[cut:]) ** 2).sum() / ((y[cut:] - y[cut:].mean()) ** 2).sum()
    return {"r2": round(r2.item(), 3), "mean_abs_error_px": round((pred - y[cut:]).abs().mean().item(), 2)}


@torch.no_grad()
def score(model, task, scenes, seed, size):
    model.eval()
    dataset = data.SyntheticDataset(scenes, image_size=size, seed=seed)
    examples = []
    for i in range(scenes):
        sample = dataset[i]
        pixels = data.preprocess(sample["image"], size, "square", normalize="clip")[0]
        examples += [(pixels, t) for t in tasks_of(sample, seed * 100_000 + i, task)]
    right = 0
    for start in range(0, len(examples), 32):
        part = examples[start:start + 32]
        outputs = model.generate(torch.stack([p for p, _ in part]),
                                 [data.chat_prompt("<image>" + t["question"]) for _, t in part], 16)
        right += sum(out == t["answer"] for out, (_, t) in zip(outputs, part))
    model.train()
    return right / max(1, len(examples)), len(examples)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", choices=SHORT_TASKS, required=True)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--scenes", type=int, default=3000)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--pretrain-steps", type=int, default=VlmRun.pretrain_steps,
                        help="stage 1's steps (default: vlmkit train's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", default="results/task_alone", help="folder for the scenes and the run")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                        help="change one entry of the default config, e.g. decoder.depth=8 or "
                             "'projector={\"type\": \"mlp\"}' (repeatable)")
    parser.add_argument("--json")
    args = parser.parse_args()
    config = json.loads(json.dumps(SMALL_VLM))
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--set wants KEY=JSON, got {item!r}")
        node, *path = [config] + key.split(".")
        for part in path[:-1]:
            if not isinstance(node.get(part), dict):
                parser.error(f"--set: the default config has no section {part!r} in {key!r}")
            node = node[part]
        node[path[-1]] = json.loads(value)
    cores = os.cpu_count() or 1
    vlmkit.set_num_threads(cores, 1)  # bf16, as `vlmkit train` sets it
    torch.manual_seed(args.seed)
    size = config["image_encoder"]["image_size"]
    folder = os.path.join(args.work, f"synthetic-{args.scenes}-{size}-seed{args.seed}")
    write_task_manifest(folder, args.scenes, args.seed, size)
    manifest = write_task_examples(folder, args.task, args.seed, size)
    model = vlmkit.build_model(config)
    result = {"task": args.task, "steps": args.steps, "scenes": args.scenes, "lr": args.lr, "set": args.set,
              "pretrain_steps": args.pretrain_steps}
    result["position_fit_random_init"] = position_fit(model, size, args.seed + 50_000)
    stage1 = pretrain_image_encoder(model, 3000, args.seed, args.pretrain_steps, precision="bf16", verbose=False,
                                    objective=VlmRun.pretrain_objective)
    result["stage1_tag_f1"] = round(stage1["pretrain/tag_f1"], 3)
    result["position_fit_stage1"] = position_fit(model, size, args.seed + 50_000)
    loader = data.Loader(manifest, batch_size=32, num_workers=2, image_size=size, seed=args.seed, drop_last=True,
                         color_jitter=0.1, pack_to=config["decoder"]["max_len"],
                         pack_image_tokens=image_tokens_per_placeholder(model, size))
    trainer = Trainer(model, steps=args.steps, lr=args.lr, weight_decay=0.05, warmup_steps=50, log_every=100,
                      checkpoint_every=0, output_dir=os.path.join(args.work, f"run-{args.task}"),
                      freeze=["image_encoder"], precision="bf16")
    start = time.perf_counter()
    summary = trainer.fit(loader)
    result["train_seconds"] = round(time.perf_counter() - start)
    result["final_train_loss"] = round(summary["loss"], 4)
    result["train_examples"] = loader._loader.num_records
    accuracy, count = score(model, args.task, 200, args.seed + VALIDATION_SEED_OFFSET, size)
    result["validation_exact_match"] = round(accuracy, 3)
    result["validation_questions"] = count
    publish(result, args.json)


if __name__ == "__main__":
    main()
