"""Where do the boxes and outlines go wrong: in the image tokens, or in the decoder's answer?

    .venv/bin/python benchmarks/box_probe.py --checkpoint DIR [--scenes 200]
        [--probe-scenes 24000] [--segment] [--json out.json]

Detection's mean IoU mixes three things a user cannot tell apart from one figure:
whether the model names the scene's objects, whether each box goes with its own
name, and how precisely a box is drawn. This splits them, on the validation scenes
(offset VALIDATION_SEED_OFFSET; "Detect the shapes.", constrained as the run's
evaluation decodes it):

* ``by_objects``: per number of objects in the scene, how often the answer has as
  many objects, names exactly the scene's objects, names them in the data's order
  (left to right), and each object's IoU with the box of its own label (what
  ``detection/mean_iou`` counts) beside its IoU with the best box under any label.
* ``decoder_edges_px``: on one-object scenes, the mean absolute error of each box
  edge in pixels (x1, y1, x2, y2), and the IoU.
* ``token_edges_px``: the same four edges read by a linear (ridge) probe from the
  projected image tokens the decoder attends to (all tokens concatenated; one-object
  scenes from ``--probe-scenes`` rendered scenes, 75% to fit, the rest held out).

If the probe reads the edges much more precisely than the decoder writes them, the
place is in the tokens and what is lost is the decoder's read-out (three digit
bytes per coordinate); if both are coarse, the tokens are.

With ``--segment``, ``segment`` splits the segmentation figure ("Segment the <object>.",
constrained as the run decodes it) the same way, per number of objects: the mask IoU
(what ``segment/mean_iou`` counts), the IoU of the outline's bounding box with the
object's (placement), and how much of its box each outline fills beside the truth's
(form); then, over all scenes, the mask IoU of the same outlines moved and scaled into
the box the model's own detection answer gives the object, and into the true box, and
of the detection box filled as a rectangle. If the refitted outlines score far above
the raw ones, what is lost is where the outline is put, not its form.
"""
import argparse
import json
import statistics
import sys
from typing import Callable, Dict, List

import torch

from vlmkit import checkpoint, data
from vlmkit import parse_polygons
from vlmkit.metrics import box_iou, mask_iou, segmentation_scores
from vlmkit.train_vlm import (DETECTION_SCHEMA, PROMPTS, SEGMENTATION_SCHEMA, VALIDATION_SEED_OFFSET, labelled_boxes,
                              labelled_ious, scene_tasks, segment_masks)

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from probes import publish  # noqa: E402

EDGES = ("x1", "y1", "x2", "y2")


def _loads(text: str):
    """The JSON value of a model's answer, or None when it does not parse."""
    try:
        return json.loads(text)
    except ValueError:
        return None


def detection_breakdown(model, size: int, scenes: int = 200, batch: int = 16) -> Dict:
    """by_objects and decoder_edges_px (module docstring) of ``model.generate``."""
    dataset = data.SyntheticDataset(scenes, image_size=size, seed=VALIDATION_SEED_OFFSET)
    samples = [dataset[i] for i in range(scenes)]
    rows: Dict[int, Dict[str, List[float]]] = {}
    edges: List[List[float]] = []
    single_iou: List[float] = []
    with torch.no_grad():
        for start in range(0, scenes, batch):
            part = samples[start:start + batch]
            images = torch.stack([data.preprocess(s["image"], size, "square", normalize="clip")[0] for s in part])
            prompts = [data.chat_prompt("<image>" + PROMPTS["detection"])] * len(part)
            for sample, out in zip(part, model.generate(images, prompts, 160, schema=DETECTION_SCHEMA)):
                named = labelled_boxes(out, _loads(out), size, size)
                labels, boxes = [l for l, _ in named], [b for _, b in named]
                truth = [o["label"] for o in sample["objects"]]
                row = rows.setdefault(len(truth), {})
                row.setdefault("count_right", []).append(float(len(labels) == len(truth)))
                row.setdefault("names_right", []).append(float(sorted(labels) == sorted(truth)))
                row.setdefault("order_right", []).append(float(labels == truth))
                row.setdefault("iou_own_label", []).extend(labelled_ious(labels, boxes, sample["objects"]))
                for o in sample["objects"]:
                    row.setdefault("iou_any_label", []).append(max([box_iou(b, o["box"]) for b in boxes] or [0.0]))
                if len(truth) == 1 and boxes:
                    edges.append([b - t for b, t in zip(boxes[0], sample["objects"][0]["box"])])
                    single_iou.append(box_iou(boxes[0], sample["objects"][0]["box"]))
    by_objects = {str(n): {"scenes": len(r["count_right"]), **{k: round(statistics.mean(v), 3) for k, v in r.items()}}
                  for n, r in sorted(rows.items())}
    out = {"scenes": scenes, "by_objects": by_objects}
    if edges:
        out["decoder_edges_px"] = {"scenes": len(edges), "iou": round(statistics.mean(single_iou), 3),
                                   **{e: round(statistics.mean(abs(r[i]) for r in edges), 2)
                                      for i, e in enumerate(EDGES)}}
    return out


def _mask_box(mask: torch.Tensor) -> List[float]:
    """[x1, y1, x2, y2] in pixels of a mask's set pixels ([0, 0, 0, 0] if none)."""
    ys, xs = torch.nonzero(mask, as_tuple=True)
    if not len(ys):
        return [0.0, 0.0, 0.0, 0.0]
    return [xs.min().item(), ys.min().item(), xs.max().item() + 1.0, ys.max().item() + 1.0]


def _fill(mask: torch.Tensor) -> float:
    """Share of its bounding box that a mask covers (0 if empty)."""
    x1, y1, x2, y2 = _mask_box(mask)
    area = (x2 - x1) * (y2 - y1)
    return mask.sum().item() / area if area else 0.0


def refit(polygon: List[float], box: List[float]) -> List[float]:
    """A flat polygon moved and scaled so that its bounds become ``box``."""
    xs, ys = polygon[0::2], polygon[1::2]
    x1, y1 = min(xs), min(ys)
    sx = (box[2] - box[0]) / max(max(xs) - x1, 1e-3)
    sy = (box[3] - box[1]) / max(max(ys) - y1, 1e-3)
    out = []
    for x, y in zip(xs, ys):
        out += [box[0] + (x - x1) * sx, box[1] + (y - y1) * sy]
    return out


def segment_breakdown(model, size: int, scenes: int = 200, batch: int = 16) -> Dict:
    """``segment`` (module docstring) of ``model.generate``: each validation scene's
    segment question, and its detection question for the refit."""
    dataset = data.SyntheticDataset(scenes, image_size=size, seed=VALIDATION_SEED_OFFSET)
    samples = [dataset[i] for i in range(scenes)]
    rows: Dict[int, Dict[str, List[float]]] = {}
    refits: Dict[str, List[float]] = {}
    with torch.no_grad():
        for start in range(0, scenes, batch):
            part = samples[start:start + batch]
            images = torch.stack([data.preprocess(s["image"], size, "square", normalize="clip")[0] for s in part])
            asked = [next(t for t in scene_tasks(s) if t["kind"] == "segment") for s in part]
            outlines = model.generate(images, [data.chat_prompt("<image>" + t["question"]) for t in asked], 160,
                                      schema=SEGMENTATION_SCHEMA)
            detections = model.generate(images, [data.chat_prompt("<image>" + PROMPTS["detection"])] * len(part), 160,
                                        schema=DETECTION_SCHEMA)
            for sample, task, out, det in zip(part, asked, outlines, detections):
                label = json.loads(task["answer"])["Object"][0]
                k = [o["label"] for o in sample["objects"]].index(label)
                truth, true_box = sample["masks"][k] != 0, sample["objects"][k]["box"]
                # As the run's evaluation scores it: the outlines under the asked label.
                raw = segmentation_scores(segment_masks(out, _loads(out), size), [(label, truth)])[0]
                polygons = parse_polygons(out, size, size)
                mask = lambda p: data.polygon_to_mask([p], size, size) != 0  # noqa: E731
                predicted = mask(polygons[0]) if polygons else torch.zeros_like(truth)
                row = rows.setdefault(len(sample["objects"]), {})
                row.setdefault("mask_iou", []).append(raw)
                row.setdefault("outline_box_iou", []).append(box_iou(_mask_box(predicted), true_box))
                row.setdefault("outline_fill", []).append(_fill(predicted))
                row.setdefault("true_fill", []).append(_fill(truth))
                own = [b for l, b in labelled_boxes(det, _loads(det), size, size) if l == label]
                refits.setdefault("raw", []).append(raw)
                refits.setdefault("into_true_box", []).append(
                    mask_iou(mask(refit(polygons[0], true_box)), truth) if polygons else 0.0)
                refits.setdefault("into_detection_box", []).append(
                    mask_iou(mask(refit(polygons[0], own[0])), truth) if polygons and own else 0.0)
                corners = lambda b: [b[0], b[1], b[2], b[1], b[2], b[3], b[0], b[3]]  # noqa: E731
                refits.setdefault("detection_box_as_mask", []).append(
                    mask_iou(mask(corners(own[0])), truth) if own else 0.0)
    by_objects = {str(n): {"scenes": len(r["mask_iou"]), **{k: round(statistics.mean(v), 3) for k, v in r.items()}}
                  for n, r in sorted(rows.items())}
    return {"scenes": scenes, "by_objects": by_objects,
            "mask_iou": {k: round(statistics.mean(v), 3) for k, v in refits.items()}}


def ridge_edges(features: torch.Tensor, boxes: torch.Tensor, ridge: float = 100.0, fit: float = 0.75) -> Dict:
    """Mean absolute error (the boxes' units) of each edge, held out, of a ridge
    regression from ``features`` [N, F] to ``boxes`` [N, 4] (x1, y1, x2, y2), and the
    mean IoU of the boxes it reads."""
    if features.dim() != 2 or boxes.shape != (features.shape[0], 4) or features.shape[0] < 8:
        raise ValueError(f"ridge_edges: expected features [N, F] and boxes [N, 4] with N >= 8, got "
                         f"{list(features.shape)} and {list(boxes.shape)}")
    x = torch.cat([features.double(), torch.ones(len(features), 1, dtype=torch.double)], 1)
    y = boxes.double()
    cut = int(fit * len(y))
    a = x[:cut]
    w = torch.linalg.solve(a.T @ a + ridge * torch.eye(a.shape[1], dtype=a.dtype), a.T @ y[:cut])
    predicted = x[cut:] @ w
    err = (predicted - y[cut:]).abs().mean(0)
    iou = statistics.mean(box_iou(p, t) for p, t in zip(predicted.tolist(), y[cut:].tolist()))
    return {"fit": cut, "held_out": len(y) - cut, "ridge": ridge, "iou": round(iou, 3),
            **{e: round(v, 2) for e, v in zip(EDGES, err.tolist())}}


def token_edges(encode: Callable[[torch.Tensor], torch.Tensor], size: int, scenes: int = 24000,
                seed: int = 777, ridge: float = 100.0) -> Dict:
    """token_edges_px (module docstring): ``encode`` maps images [B, 3, H, W] to the
    projected tokens [B, N, D] (EncoderDecoder.encode_images)."""
    dataset = data.SyntheticDataset(scenes, image_size=size, seed=seed)
    feats, boxes, pending, pending_boxes = [], [], [], []
    with torch.no_grad():
        for i in range(scenes):
            sample = dataset[i]
            if len(sample["objects"]) != 1:
                continue
            pending.append(data.preprocess(sample["image"], size, "square", normalize="clip")[0])
            pending_boxes.append(sample["objects"][0]["box"])
            if len(pending) == 64:
                feats.append(encode(torch.stack(pending)).flatten(1).float())
                boxes += pending_boxes
                pending, pending_boxes = [], []
        if pending:
            feats.append(encode(torch.stack(pending)).flatten(1).float())
            boxes += pending_boxes
    return ridge_edges(torch.cat(feats), torch.tensor(boxes, dtype=torch.double), ridge)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default="runs/vlm")
    parser.add_argument("--scenes", type=int, default=200, help="validation scenes for the decoder's answers")
    parser.add_argument("--probe-scenes", type=int, default=24000,
                        help="rendered scenes whose one-object scenes fit and test the probe (0: skip)")
    parser.add_argument("--segment", action="store_true", help="also split the segmentation figure (segment)")
    parser.add_argument("--json")
    args = parser.parse_args()
    model = checkpoint.load(args.checkpoint)["model"].eval()
    size = model.config["image_encoder"]["image_size"]
    result = {"checkpoint": args.checkpoint, **detection_breakdown(model, size, args.scenes)}
    if args.segment:
        result["segment"] = segment_breakdown(model, size, args.scenes)
    if args.probe_scenes > 0:
        result["token_edges_px"] = token_edges(model.cpp_module.encode_images, size, args.probe_scenes)
    publish(result, args.json)


if __name__ == "__main__":
    main()
