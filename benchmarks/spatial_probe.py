"""Has the model learnt to compare two objects' places, or is it guessing?

    .venv/bin/python benchmarks/spatial_probe.py --checkpoint DIR [--scenes 600] [--json out.json]

The spatial question ("Is the red circle left of the blue square?") is yes or no,
so a model that guesses scores ~0.5 and one accuracy cannot tell a guess from a
coarse reading of the places. This splits the accuracy on the validation scenes
(offset VALIDATION_SEED_OFFSET; greedy answers, as the run's evaluation decodes):

* ``by_distance``: by the horizontal distance between the two objects' centres
  (< 8, 8-16, 16-32, >= 32 px). A model that reads both places and compares them
  errs where the objects are close and not where they are far apart; a guess is
  flat across the buckets.
* ``by_truth``: by the true answer, and ``answers``: each (truth, answer) pair's
  count, which shows a model leaning to one answer.
* ``by_objects``: by the number of objects in the scene (2 or 3).
"""
import argparse
import sys
from typing import Dict, List

import torch

from vlmkit import checkpoint, data
from vlmkit.train_vlm import VALIDATION_SEED_OFFSET, scene_tasks

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from probes import publish  # noqa: E402

BUCKETS = ((8, "<8px"), (16, "8-16px"), (32, "16-32px"), (float("inf"), ">=32px"))
PREFIX, MIDDLE = "Is the ", " left of the "


def centre_distance(question: str, objects: List[Dict]) -> float:
    """Horizontal distance in pixels between the centres of the two objects a
    spatial question names."""
    if not (question.startswith(PREFIX) and question.endswith("?") and MIDDLE in question):
        raise ValueError(f"expected 'Is the <label> left of the <label>?', got {question!r}")
    a, b = question[len(PREFIX):-1].split(MIDDLE)
    boxes = {o["label"]: o["box"] for o in objects}
    if a not in boxes or b not in boxes:
        raise ValueError(f"{question!r} names an object the scene does not have: {sorted(boxes)}")
    return abs((boxes[a][0] + boxes[a][2]) / 2 - (boxes[b][0] + boxes[b][2]) / 2)


def spatial_breakdown(model, size: int, scenes: int = 600, batch: int = 32) -> Dict:
    """The splits of the module docstring, from ``model.generate``."""
    dataset = data.SyntheticDataset(scenes, image_size=size, seed=VALIDATION_SEED_OFFSET)
    questions = []
    for i in range(scenes):
        sample = dataset[i]
        for task in scene_tasks(sample):
            if task["kind"] == "spatial":
                questions.append((sample, task))
    rows: Dict[str, Dict[str, List[float]]] = {"by_distance": {}, "by_truth": {}, "by_objects": {}}
    answers: Dict[str, int] = {}
    right: List[float] = []
    with torch.no_grad():
        for start in range(0, len(questions), batch):
            part = questions[start:start + batch]
            images = torch.stack([data.preprocess(s["image"], size, "square", normalize="clip")[0] for s, _ in part])
            prompts = [data.chat_prompt("<image>" + t["question"]) for _, t in part]
            for (sample, task), out in zip(part, model.generate(images, prompts, 8)):
                ok = float(out == task["answer"])
                right.append(ok)
                distance = centre_distance(task["question"], sample["objects"])
                bucket = next(name for bound, name in BUCKETS if distance < bound)
                rows["by_distance"].setdefault(bucket, []).append(ok)
                rows["by_truth"].setdefault(task["answer"], []).append(ok)
                rows["by_objects"].setdefault(str(len(sample["objects"])), []).append(ok)
                key = f"{task['answer']} -> {out}"
                answers[key] = answers.get(key, 0) + 1
    order = {name: rank for rank, (_, name) in enumerate(BUCKETS)}
    out = {"scenes": scenes, "questions": len(right),
           "accuracy": round(sum(right) / len(right), 3) if right else None}
    for split, groups in rows.items():
        out[split] = {k: {"questions": len(v), "accuracy": round(sum(v) / len(v), 3)}
                      for k, v in sorted(groups.items(), key=lambda kv: order.get(kv[0], kv[0]))}
    out["answers"] = dict(sorted(answers.items()))
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default="runs/vlm")
    parser.add_argument("--scenes", type=int, default=600, help="validation scenes (62%% have a spatial question)")
    parser.add_argument("--json")
    args = parser.parse_args()
    model = checkpoint.load(args.checkpoint)["model"].eval()
    size = model.config["image_encoder"]["image_size"]
    publish({"checkpoint": args.checkpoint, **spatial_breakdown(model, size, args.scenes)}, args.json)


if __name__ == "__main__":
    main()
