"""benchmarks/box_probe.py, behind docs/training.md's "Where the boxes go wrong":
its split of the detection figure and its edge probe must measure what they say."""
import json
import pathlib
import sys

import pytest
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "benchmarks"))
import box_probe  # noqa: E402
from vlmkit import data  # noqa: E402
from vlmkit.train_vlm import VALIDATION_SEED_OFFSET, scene_tasks  # noqa: E402

SIZE, SCENES = 64, 24


def detection_answers():
    dataset = data.SyntheticDataset(SCENES, image_size=SIZE, seed=VALIDATION_SEED_OFFSET)
    return [next(t["answer"] for t in scene_tasks(dataset[i]) if t["kind"] == "detection") for i in range(SCENES)]


class Scripted:
    """Answers from a list, in the order the probe asks."""

    def __init__(self, answers):
        self.answers = list(answers)

    def generate(self, images, prompts, budget, schema=None):
        assert schema is not None  # decoded as the run's evaluation decodes it
        out, self.answers = self.answers[:len(prompts)], self.answers[len(prompts):]
        return out


def test_breakdown_of_the_right_answers_is_perfect():
    result = box_probe.detection_breakdown(Scripted(detection_answers()), SIZE, SCENES)
    assert sum(row["scenes"] for row in result["by_objects"].values()) == SCENES
    assert len(result["by_objects"]) >= 2
    for row in result["by_objects"].values():
        assert row["count_right"] == row["names_right"] == row["order_right"] == 1.0
        # Boxes go through the 0-999 scale and back: IoU just below 1.
        assert row["iou_own_label"] > 0.9 and row["iou_any_label"] > 0.9
    edges = result["decoder_edges_px"]
    assert edges["scenes"] == result["by_objects"]["1"]["scenes"]
    assert max(edges[e] for e in box_probe.EDGES) < 0.5 and edges["iou"] > 0.9


def test_swapped_names_keep_the_boxes_but_lose_the_labelled_iou():
    swapped = []
    for answer in detection_answers():
        value = json.loads(answer)
        value["Object"] = value["Object"][::-1]
        swapped.append(json.dumps(value))
    result = box_probe.detection_breakdown(Scripted(swapped), SIZE, SCENES)
    multi = [row for n, row in result["by_objects"].items() if int(n) >= 2]
    assert multi
    for row in multi:
        assert row["names_right"] == 1.0 and row["order_right"] == 0.0
        assert row["iou_any_label"] > 0.9 and row["iou_own_label"] < 0.6
    assert result["by_objects"]["1"]["iou_own_label"] > 0.9
    # Unparseable answers count as no objects, never as a crash.
    empty = box_probe.detection_breakdown(Scripted(["not json"] * SCENES), SIZE, SCENES)
    assert all(row["count_right"] == 0.0 and row["iou_any_label"] == 0.0 for row in empty["by_objects"].values())
    assert "decoder_edges_px" not in empty


def test_ridge_edges_reads_what_is_linearly_there_and_nothing_else():
    g = torch.Generator().manual_seed(0)
    corner = torch.rand(800, 2, generator=g) * 40
    boxes = torch.cat([corner, corner + 4 + torch.rand(800, 2, generator=g) * 20], 1)
    mixing = torch.randn(4, 32, generator=g)
    readable = boxes @ mixing + 0.01 * torch.randn(800, 32, generator=g)
    near = box_probe.ridge_edges(readable, boxes, ridge=1e-3)
    assert near["fit"] == 600 and near["held_out"] == 200
    assert max(near[e] for e in box_probe.EDGES) < 0.1 and near["iou"] > 0.98
    noise = box_probe.ridge_edges(torch.randn(800, 32, generator=g), boxes, ridge=1e-3)
    assert min(noise[e] for e in box_probe.EDGES) > 5 and noise["iou"] < 0.3
    with pytest.raises(ValueError, match=r"features \[N, F\] and boxes \[N, 4\]"):
        box_probe.ridge_edges(readable, boxes[:, :3])


def test_token_edges_of_an_encoder_that_writes_the_box_into_its_tokens():
    dataset = data.SyntheticDataset(300, image_size=SIZE, seed=777)
    boxes = {}
    for i in range(len(dataset)):
        sample = dataset[i]
        if len(sample["objects"]) == 1:
            pixels = data.preprocess(sample["image"], SIZE, "square", normalize="clip")[0]
            boxes[pixels.sum().item()] = sample["objects"][0]["box"]

    def encode(images):  # looks each image's box up: a perfect encoder
        return torch.tensor([boxes[img.sum().item()] for img in images], dtype=torch.float)[:, None, :]

    result = box_probe.token_edges(encode, SIZE, scenes=300, ridge=1e-6)
    assert result["fit"] + result["held_out"] == len(boxes)
    assert max(result[e] for e in box_probe.EDGES) < 0.01


def segment_script(move=0):
    """The answers segment_breakdown asks for, batch by batch (16 segment answers, then
    16 detection answers): the right ones, each outline moved right by ``move`` units."""
    dataset = data.SyntheticDataset(SCENES, image_size=SIZE, seed=VALIDATION_SEED_OFFSET)
    tasks = [{t["kind"]: t["answer"] for t in scene_tasks(dataset[i])} for i in range(SCENES)]
    answers = []
    for start in range(0, SCENES, 16):
        for t in tasks[start:start + 16]:
            value = json.loads(t["segment"])
            value["Polygon"] = [[min(999, v + move) if i % 2 == 0 else v for i, v in enumerate(p)]
                                for p in value["Polygon"]]
            answers.append(json.dumps(value))
        answers += [t["detection"] for t in tasks[start:start + 16]]
    return answers


def test_segment_breakdown_tells_placement_from_form():
    right = box_probe.segment_breakdown(Scripted(segment_script()), SIZE, SCENES)
    assert sum(row["scenes"] for row in right["by_objects"].values()) == SCENES
    for row in right["by_objects"].values():
        assert row["mask_iou"] > 0.85 and row["outline_box_iou"] > 0.85
        assert abs(row["outline_fill"] - row["true_fill"]) < 0.1
    assert right["mask_iou"]["raw"] > 0.85 and right["mask_iou"]["into_true_box"] > 0.85
    # The same outlines put 8 px to the right: the raw IoU falls, the refit ones do not.
    moved = box_probe.segment_breakdown(Scripted(segment_script(move=125)), SIZE, SCENES)
    assert moved["mask_iou"]["raw"] < 0.6
    assert moved["mask_iou"]["into_true_box"] > 0.85 and moved["mask_iou"]["into_detection_box"] > 0.8
    assert 0.5 < moved["mask_iou"]["detection_box_as_mask"] < 0.95  # shapes fill part of their boxes
    # Unparseable answers score 0, never crash.
    broken = box_probe.segment_breakdown(Scripted(["not json"] * (2 * SCENES)), SIZE, SCENES)
    assert all(v == 0.0 for v in broken["mask_iou"].values())
