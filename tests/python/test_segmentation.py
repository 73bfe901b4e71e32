"""Segmentation: masks as polygons a decoder writes, the data that carries them, the
transforms that move them, the metrics that score them and the pictures that show them."""
import json

import pytest
import torch

import vlmkit
from vlmkit import cli, data, metrics
from vlmkit.train_vlm import scene_tasks, segment_masks


def disc(height=40, width=50, cx=20, cy=18, r=11):
    y, x = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    return (((x + 0.5 - cx) ** 2 + (y + 0.5 - cy) ** 2) <= r * r).to(torch.uint8)


def test_mask_polygon_round_trip_and_the_text_format():
    mask = disc()
    exact = data.mask_to_polygons(mask, max_vertices=100000)
    assert len(exact) == 1
    assert torch.equal(data.polygon_to_mask(exact, 40, 50), mask)
    simple = data.mask_to_polygon(mask)  # at most 12 vertices
    assert 6 <= len(simple) <= 24 and len(simple) % 2 == 0
    assert metrics.mask_iou(data.polygon_to_mask([simple], 40, 50), mask) > 0.93
    answer = data.segmentation_answer(["disc"], [simple], 50, 40)
    value = json.loads(answer)
    assert value["Object"] == ["disc"] and all(0 <= v <= 999 for v in value["Polygon"][0])
    back = vlmkit.parse_polygons(answer, 50, 40)
    assert len(back) == 1 and metrics.mask_iou(data.polygon_to_mask(back, 40, 50), mask) > 0.9
    # Bounding boxes in the same text are not polygons.
    assert len(vlmkit.parse_polygons('{"Bounding_box": [[1, 2, 3, 4]], "Polygon": [[1, 2, 3, 4, 5, 6]]}', 9, 9)) == 1


def test_hostile_masks_and_polygons_raise_value_errors():
    with pytest.raises(ValueError, match="mask"):
        data.mask_to_polygon(torch.zeros(5, 5, dtype=torch.uint8))  # empty
    with pytest.raises(ValueError, match=r"\[H, W\]"):
        data.mask_to_polygons(torch.zeros(2, 5, 5, dtype=torch.uint8))
    with pytest.raises(ValueError, match="bool or integer"):
        data.mask_to_polygons(torch.zeros(5, 5))
    with pytest.raises(ValueError, match="even count"):
        data.polygon_to_mask([[1, 2, 3, 4, 5]], 5, 5)
    with pytest.raises(ValueError, match="finite"):
        data.polygon_to_mask([[1, 2, 3, float("nan"), 5, 6]], 5, 5)
    with pytest.raises(ValueError, match="runs"):
        data.decode_coco_rle([4, 1], 3, 3)
    with pytest.raises(ValueError, match="one size"):
        metrics.mask_iou(torch.zeros(3, 3), torch.zeros(4, 4))


def test_coco_rle_round_trip():
    mask = disc(37, 29, 14, 18, 10)
    counts = data.encode_coco_rle(mask)
    assert isinstance(counts, str)
    assert torch.equal(data.decode_coco_rle(counts, 37, 29), mask)
    centre = data.decode_coco_rle([4, 1, 4], 3, 3)
    assert centre.sum() == 1 and centre[1, 1] == 1


def test_synthetic_scenes_carry_exact_masks_and_a_segment_task():
    dataset = data.SyntheticDataset(30, seed=1, word_probability=0)
    for i in range(30):
        sample = dataset[i]
        masks = sample["masks"]
        assert masks.shape == (len(sample["objects"]), 64, 64) and masks.dtype == torch.uint8
        for o, m in zip(sample["objects"], masks):
            # The mask is the object's own pixels: inside its box (anti-aliased edges may reach one
            # pixel past it), and the traced outline gives it back.
            x1, y1, x2, y2 = map(int, o["box"])
            assert m.sum() == m[max(0, y1 - 1):y2 + 1, max(0, x1 - 1):x2 + 1].sum() > 50
            assert torch.equal(data.polygon_to_mask([o["polygon"]], 64, 64), m)
        task = next(t for t in scene_tasks(sample) if t["kind"] == "segment")
        label = task["question"][len("Segment the "):-1]
        assert json.loads(task["answer"])["Object"] == [label]
        named = segment_masks(task["answer"], json.loads(task["answer"]), 64)
        truth = masks[[o["label"] for o in sample["objects"]].index(label)]
        assert named[0][0] == label and metrics.mask_iou(named[0][1], truth) > 0.85
    # The objects' colours match the masks: the pixels of a red object are red.
    sample = dataset[0]
    rgb = torch.tensor(data.SyntheticDataset.colour_rgb(sample["objects"][0]["label"].split()[0]), dtype=torch.float)
    inside = sample["image"][sample["masks"][0].bool()].float()
    assert (inside - rgb).abs().mean() < 20


def test_transforms_move_polygons_like_the_pixels():
    mask = disc(48, 64, 30, 20, 12)
    picture = (mask * 255).unsqueeze(-1).expand(48, 64, 3).contiguous()
    polygons = data.mask_to_polygons(mask, 100000)
    # Flip: exact.
    flipped, _, moved = data.horizontal_flip(picture, None, polygons)
    assert torch.equal(data.polygon_to_mask(moved, 48, 64), flipped[..., 0] // 255)
    # Random resized crop, boxes and polygons together.
    for seed in range(5):
        out, boxes, moved = data.random_resized_crop(picture, 32, seed, (0.3, 1.0), (0.75, 1.33),
                                                     [[18, 8, 42, 32]], polygons)
        assert len(boxes) == len(moved)
        if moved:
            assert metrics.mask_iou(data.polygon_to_mask(moved, 32, 32), out[..., 0] >= 128) > 0.85
    # Letterbox.
    boxed, _, info = data.letterbox(picture, 32, None, 0)
    moved = data.letterbox_polygons(polygons, info)
    assert metrics.mask_iou(data.polygon_to_mask(moved, 32, 32), boxed[..., 0] >= 128) > 0.85
    # Dynamic resolution and tiles keep the 0..999 text valid: the same answer rasterised at
    # the new size covers the resized object.
    answer = data.segmentation_answer(["disc"], polygons, 64, 48, 100000)
    h, w = data.dynamic_resolution(48, 64, 8, 2, 16 * 16, 40 * 40)
    resized = data.resize_image(picture, h, w)
    again = data.polygon_to_mask(vlmkit.parse_polygons(answer, w, h), h, w)
    assert (h, w) != (48, 64) and metrics.mask_iou(again, resized[..., 0] >= 128) > 0.85
    tiles, _ = data.tile_image(picture, 32, 4, True)
    global_view = tiles[0]
    again = data.polygon_to_mask(vlmkit.parse_polygons(answer, 32, 32), 32, 32)
    assert metrics.mask_iou(again, global_view[..., 0] >= 128) > 0.85


def coco_file(tmp_path, segmentation):
    picture = torch.zeros(40, 60, 3, dtype=torch.uint8)
    data.save_png(picture, str(tmp_path / "a.png"))
    doc = {"images": [{"id": 1, "file_name": "a.png", "width": 60, "height": 40}],
           "categories": [{"id": 2, "name": "blob"}],
           "annotations": [{"image_id": 1, "bbox": [10, 5, 20, 20], "category_id": 2,
                            "segmentation": segmentation}]}
    (tmp_path / "instances.json").write_text(json.dumps(doc))
    return tmp_path / "instances.json"


@pytest.mark.parametrize("kind", ["polygon", "rle_counts", "rle_string"])
def test_coco_segmentation_reader_keeps_polygons_and_reads_rle(tmp_path, kind):
    mask = torch.zeros(40, 60, dtype=torch.uint8)
    mask[5:25, 10:30] = 1
    segmentation = {"polygon": [[10, 5, 30, 5, 30, 25, 10, 25]],
                    "rle_string": {"counts": data.encode_coco_rle(mask), "size": [40, 60]}}.get(kind)
    if kind == "rle_counts":
        flat = mask.t().reshape(-1).tolist()
        counts, value, run = [], 0, 0
        for v in flat:
            if v != value:
                counts.append(run)
                run, value = 0, v
            run += 1
        counts.append(run)
        segmentation = {"counts": counts, "size": [40, 60]}
    path = coco_file(tmp_path, segmentation)
    records, _ = data.read_records(path, "coco_segmentation")
    assert len(records) == 1
    record = records[0]
    assert record["turns"][0][1] == "Segment the objects."
    answer = json.loads(record["turns"][1][1])
    assert answer["Object"] == ["blob"] and len(answer["Polygon"]) == 1
    assert metrics.mask_iou(data.polygon_to_mask(record["polygons"], 40, 60), mask) > 0.95
    # The detection task of the same file keeps the outline beside the box.
    records, _ = data.read_records(path, "coco_instances")
    assert "Bounding_box" in records[0]["turns"][1][1] and len(records[0]["polygons"]) == 1


def test_coco_segmentation_refuses_what_it_cannot_answer(tmp_path):
    path = coco_file(tmp_path, [])
    with pytest.raises(ValueError, match="segmentation"):
        data.read_records(path, "coco_segmentation")
    path = coco_file(tmp_path, {"counts": [5], "size": [40, 60]})
    with pytest.raises(ValueError, match="RLE"):
        data.read_records(path, "coco_instances")
    path = coco_file(tmp_path, {"counts": [2400], "size": [60, 40]})  # height and width swapped
    with pytest.raises(ValueError, match="size"):
        data.read_records(path, "coco_instances")


def test_loader_rewrites_segmentation_answers_under_letterbox(tmp_path):
    path = coco_file(tmp_path, [[10, 5, 30, 5, 30, 25, 10, 25]])
    tokenizer = data.ByteTokenizer()
    for resize in ("square", "letterbox"):
        loader = data.Loader(path, format="coco_segmentation", image_size=32, resize=resize, batch_size=1,
                             shuffle=False)
        batch = next(iter(loader))
        ids = batch["labels"][0][batch["labels"][0] >= 0].tolist()
        answer = json.loads(tokenizer.decode(ids[:-1]))  # without <eos>
        got = data.polygon_to_mask(vlmkit.parse_polygons(json.dumps(answer), 32, 32), 32, 32)
        # Where the 20 x 20 square lands in the 32 x 32 model input.
        want = torch.zeros(32, 32, dtype=torch.uint8)
        if resize == "square":  # stretched: x by 32/60, y by 32/40
            want[4:20, 5:16] = 1
        else:  # scaled by 32/60, 5 rows of padding above
            want[8:19, 5:16] = 1
        assert metrics.mask_iou(got, want) > 0.8, resize


def test_segmentation_metrics():
    a = disc(20, 20, 10, 10, 5)
    b = disc(20, 20, 12, 10, 5)
    assert metrics.mask_iou(a, a) == 1.0 and 0 < metrics.mask_iou(a, b) < 1
    assert metrics.mask_iou(torch.zeros(3, 3), torch.zeros(3, 3)) == 0.0
    truth = [("red circle", a), ("blue square", b)]
    assert metrics.segmentation_scores([("red circle", a), ("blue square", b)], truth) == [1.0, 1.0]
    # A right outline under the wrong label scores nothing.
    assert metrics.segmentation_scores([("green circle", a)], truth) == [0.0, 0.0]
    preds = [(0, "red circle", a, 0.0), (0, "blue square", b, -1.0)]
    truths = [(0, "red circle", a), (0, "blue square", b)]
    assert metrics.average_precision(preds, truths, 0.5, iou=metrics.mask_iou) == 1.0
    swapped = [(0, "red circle", b, 0.0), (0, "blue square", disc(20, 20, 2, 2, 1), -1.0)]
    assert metrics.average_precision(swapped, truths, 0.9, iou=metrics.mask_iou) == 0.0


def test_plot_masks_tints_inside_and_leaves_outside(tmp_path):
    picture = torch.full((40, 50, 3), 100, dtype=torch.uint8)
    mask = disc()
    drawn = data.plot_masks(picture, [data.mask_to_polygon(mask)], ["disc"], path=tmp_path / "m.png")
    assert (tmp_path / "m.png").exists()
    assert drawn.shape == picture.shape
    changed = (drawn != picture).any(-1)
    inside = mask.bool() & (disc(40, 50, 20, 18, 8).bool())  # well inside the outline
    assert changed[inside].all()
    assert not changed[0:4, 40:50].any()  # far from the disc and its label
    with pytest.raises(ValueError, match="labels"):
        data.plot_masks(picture, [data.mask_to_polygon(mask)], ["a", "b"])


def test_predict_segment_draws_masks(tmp_path, capsys):
    run = tmp_path / "run"
    assert cli.main(["train", "--steps", "3", "--scenes", "20", "--eval-scenes", "1", "--pretrain-steps", "2",
                     "--output", str(run)]) == 0
    image = tmp_path / "scene.png"
    data.save_png(data.SyntheticDataset(1, seed=5)[0]["image"], str(image))
    capsys.readouterr()
    code = cli.main(["predict", "--checkpoint", str(run), "--image", str(image), "--task", "segment",
                     "--prompt", "Segment the red circle."])
    assert code == 0
    printed = capsys.readouterr()
    value = json.loads(printed.out.strip().splitlines()[-1])
    assert set(value) == {"Object", "Polygon"}
    assert (tmp_path / "scene.masks.png").exists()
    assert cli.main(["predict", "--checkpoint", str(run), "--image", str(image), "--task", "segment",
                     "--schema", "x.json"]) == 2
    # vlmkit eval on segmentation records scores the masks against the records' polygons.
    path = coco_file(tmp_path, [[10, 5, 30, 5, 30, 25, 10, 25]])
    out = tmp_path / "eval.json"
    assert cli.main(["eval", "--checkpoint", str(run), "--data", str(path), "--format", "coco_segmentation",
                     "--json", str(out)]) == 0
    scores = json.loads(out.read_text())
    assert scores["records"] == 1.0 and 0.0 <= scores["segment/mean_iou"] <= 1.0 and "segment/mask_map50" in scores
