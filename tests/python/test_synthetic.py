"""The synthetic multitask dataset: deterministic, and its answers agree with its pixels."""
import json

import pytest
import torch

import vlmkit
from vlmkit import data


def test_deterministic_from_seed_and_index():
    a, b = data.SyntheticDataset(10, seed=3), data.SyntheticDataset(10, seed=3)
    assert len(a) == 10
    assert torch.equal(a[4]["image"], b[4]["image"]) and a[4]["caption"] == b[4]["caption"]
    assert not torch.equal(a[4]["image"], a[5]["image"])
    assert not torch.equal(a[4]["image"], data.SyntheticDataset(10, seed=4)[4]["image"])
    assert torch.equal(a[-1]["image"], a[9]["image"])
    with pytest.raises(IndexError):
        a[10]
    with pytest.raises(ValueError, match="max_shapes"):
        data.SyntheticDataset(5, max_shapes=9)


def test_answers_agree_with_the_pixels():
    dataset = data.SyntheticDataset(40, image_size=64, seed=1)
    kinds, words = set(), 0
    for i in range(len(dataset)):
        sample = dataset[i]
        image = sample["image"].int()
        objects = sample["objects"]
        for obj in objects:
            # Re-detect the colour from the pixel at the box centre.
            x1, y1, x2, y2 = obj["box"]
            centre = image[int((y1 + y2) / 2), int((x1 + x2) / 2)]
            colour = obj["label"].split()[0]
            expected = torch.tensor(data.SyntheticDataset.colour_rgb(colour))
            assert (centre - expected).abs().max() <= 12, (i, obj, centre)
        labels = [o["label"].split() for o in objects]
        assert len({c for c, _ in labels}) == len(labels) and len({s for _, s in labels}) == len(labels)
        answers = {q["kind"]: q for q in sample["questions"]}
        kinds.update(answers)
        assert answers["count"]["answer"] == str(len(objects))
        by_shape = {l.split()[1]: l.split()[0] for l in (o["label"] for o in objects)}
        by_colour = {c: s for s, c in by_shape.items()}
        asked_shape = answers["colour"]["question"][len("What colour is the "):-1]
        asked_colour = answers["shape"]["question"][len("What shape is "):-1]
        assert answers["colour"]["answer"] == by_shape[asked_shape]
        assert answers["shape"]["answer"] == by_colour[asked_colour]
        if "spatial" in answers:
            q = answers["spatial"]["question"]
            a_label, b_label = q[len("Is the "):-1].split(" left of the ")
            boxes = {o["label"]: o["box"] for o in objects}
            left = boxes[a_label][0] + boxes[a_label][2] < boxes[b_label][0] + boxes[b_label][2]
            assert answers["spatial"]["answer"] == ("yes" if left else "no")
        parsed = vlmkit.parse_boxes(json.dumps(sample["detection"]["Bounding_box"]), 64, 64)
        assert len(parsed) == len(objects)
        for got, obj in zip(parsed, objects):
            assert got == pytest.approx(obj["box"], abs=0.1)
        assert sample["detection"]["Object"] == [o["label"] for o in objects]
        assert sample["extraction"]["Shapes"] == str(len(objects))
        words += bool(sample["ocr"])
        if sample["ocr"]:
            assert sample["ocr"] in data.SyntheticDataset.words and sample["ocr"] in sample["caption"]
            # The word is white text in the bottom strip.
            assert (image[-20:] > 200).all(dim=-1).sum() > 5
    assert kinds == {"colour", "shape", "count", "spatial"}
    assert 5 < words < 35


def test_written_to_disk_and_reloaded(tmp_path):
    dataset = data.SyntheticDataset(6, image_size=48, seed=2)
    dataset.write(str(tmp_path))
    lines = (tmp_path / "manifest.jsonl").read_text().splitlines()
    assert len(lines) == 6 and not (tmp_path / "manifest.jsonl.partial").exists()
    for i, line in enumerate(lines):
        entry = json.loads(line)
        image = data.load_image(tmp_path / entry["image"])
        assert torch.equal(image, dataset[i]["image"])
        assert entry["caption"] == dataset[i]["caption"]


def test_questions_have_no_shortcut_that_ignores_the_question():
    """Catches the old generator: colour and shape questions always asked about the
    leftmost object (its colour answered every colour question), and the spatial
    answer was "yes" unless the object asked about was the rightmost (0.58 "yes")."""
    dataset = data.SyntheticDataset(400, image_size=64, seed=3)
    leftmost, multi, yes, spatial = 0, 0, 0, 0
    for i in range(len(dataset)):
        sample = dataset[i]
        objects = sample["objects"]
        answers = {q["kind"]: q for q in sample["questions"]}
        if len(objects) >= 2:
            multi += 1
            leftmost += answers["colour"]["answer"] == objects[0]["label"].split()[0]
        if "spatial" in answers:
            spatial += 1
            yes += answers["spatial"]["answer"] == "yes"
    # 2-3 objects (the default max_shapes): the leftmost one is asked about in about 0.4 of them.
    assert 0.2 < leftmost / multi < 0.5, leftmost / multi
    assert 0.42 < yes / spatial < 0.58, yes / spatial
