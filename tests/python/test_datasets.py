"""Dataset readers (JSONL manifest, LLaVA, COCO), the prompt template and the
threaded loader."""
import base64
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

import vlmkit
from vlmkit import data, text


def write_png(path, colour=(200, 30, 30), size=(20, 16)):
    Image.new("RGB", size, colour).save(path)


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "img").mkdir()
    for i in range(6):
        write_png(tmp_path / "img" / f"{i}.png", (40 * i, 100, 200 - 30 * i))
    return tmp_path


def test_jsonl_manifest_reads_every_kind_of_entry(folder):
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(buffer, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    lines = [
        {"image": "img/0.png", "text": "a red square"},
        {"image": "img/1.png", "question": "What colour?", "answer": "blue"},
        {"image": str(folder / "img" / "2.png"), "caption": "absolute path"},
        {"image": url, "conversations": [{"from": "human", "value": "<image>\nHi"}, {"from": "gpt", "value": "Hello"},
                                         {"from": "human", "value": "More?"}, {"from": "gpt", "value": "No"}]},
        {"image": "img/3.png", "text": "boxes", "boxes": [[1, 2, 10, 12]], "labels": ["cat"]},
    ]
    manifest = folder / "train.jsonl"
    manifest.write_text("\n".join(json.dumps(l) for l in lines) + "\n\n")
    records, report = data.read_records(manifest)
    assert report == {"read": 5, "skipped": 0, "problems": []}
    assert records[0]["turns"] == [("user", "Describe the image."), ("assistant", "a red square")]
    assert records[1]["turns"][0] == ("user", "What colour?")
    assert records[3]["turns"][2] == ("user", "More?") and records[3]["image"].startswith("data:")
    assert records[4]["boxes"] == [[1, 2, 10, 12]] and records[4]["labels"] == ["cat"]
    assert records[0]["image"] == str(folder / "img" / "0.png")


def test_malformed_lines_raise_with_line_numbers_or_are_skipped_and_counted(folder):
    lines = [
        json.dumps({"image": "img/0.png", "text": "fine"}),
        "{not json",
        json.dumps({"text": "no image"}),
        json.dumps({"image": "img/1.png", "text": 7}),
        json.dumps({"image": "../outside.png", "text": "escapes"}),
        json.dumps({"image": "img/1.png", "text": "x", "boxes": [[5, 5, 1, 1]]}),
        json.dumps([1, 2]),
        json.dumps({"image": "img/2.png", "question": "only a question"}),
    ]
    manifest = folder / "bad.jsonl"
    manifest.write_text("\n".join(lines))
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not valid JSON"):
        data.read_records(manifest)
    records, report = data.read_records(manifest, bad_samples="skip")
    assert len(records) == 1 and report["skipped"] == 7
    problems = "\n".join(report["problems"])
    for expected in (":3: missing 'image'", ":4: 'text' must be a string", ":5: image path '../outside.png' escapes",
                     ":6: a box needs", ":7: expected a JSON object", ":8: 'question' needs 'answer'"):
        assert expected in problems, expected
    with pytest.raises(FileNotFoundError):
        data.read_records(folder / "nope.jsonl")
    with pytest.raises(ValueError, match="unknown dataset format 'csv'"):
        data.read_records(manifest, format="csv")


def test_llava_and_coco_files(folder):
    llava = folder / "llava.json"
    llava.write_text(json.dumps([
        {"id": "a", "image": "img/0.png", "conversations": [{"from": "human", "value": "<image>\nWhat is it?"},
                                                          {"from": "gpt", "value": "A square."}]},
        {"id": "b", "image": "img/1.png", "conversations": [{"from": "gpt", "value": "starts wrong"}]},
    ]))
    with pytest.raises(ValueError, match="llava.json:2: a conversation starts with the user"):
        data.read_records(llava, "llava")
    records, report = data.read_records(llava, "llava", bad_samples="skip")
    assert len(records) == 1 and report["skipped"] == 1
    coco = {"images": [{"id": 1, "file_name": "img/0.png", "width": 20, "height": 16},
                       {"id": 2, "file_name": "img/1.png", "width": 20, "height": 16}],
            "annotations": [{"image_id": 1, "caption": "a red thing"}, {"image_id": 2, "caption": "blue"},
                            {"image_id": 9, "caption": "missing image"}],
            "categories": [{"id": 3, "name": "cat"}]}
    (folder / "captions.json").write_text(json.dumps(coco))
    records, report = data.read_records(folder / "captions.json", "coco_captions", bad_samples="skip")
    assert [r["turns"][1][1] for r in records] == ["a red thing", "blue"] and report["skipped"] == 1
    coco["annotations"] = [{"image_id": 1, "bbox": [2, 3, 10, 8], "category_id": 3},
                           {"image_id": 1, "bbox": [0, 0, 40, 40], "category_id": 3},
                           {"image_id": 2, "bbox": [1, 1, 4, 4], "category_id": 99}]
    (folder / "instances.json").write_text(json.dumps(coco))
    with pytest.raises(ValueError, match="instances.json:2: box .* outside the 20x16 image"):
        data.read_records(folder / "instances.json", "coco_instances")
    records, report = data.read_records(folder / "instances.json", "coco_instances", bad_samples="skip")
    assert len(records) == 1 and report["skipped"] == 2
    assert records[0]["boxes"] == [[2, 3, 12, 11]] and records[0]["labels"] == ["cat"]
    answer = json.loads(records[0]["turns"][1][1])
    assert answer["Object"] == ["cat"] and vlmkit.parse_boxes(json.dumps(answer), 20, 16)[0] == pytest.approx([2, 3, 12, 11], abs=0.05)
    (folder / "broken.json").write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        data.read_records(folder / "broken.json", "coco_captions")


def test_prompt_template_single_and_multi_turn():
    single = data.encode_conversation([("user", "<image>What colour?"), ("assistant", "red")])
    ids, labels = single["input_ids"], single["labels"]
    assert text.decode(ids) == "User: What colour?\nAssistant: red"
    assert single["image_positions"] == [7] and ids[7] == text.IMAGE
    answer = [t for t, l in zip(ids, labels) if l != -100]
    assert text.decode(answer) == "red" and answer[-1] == text.EOS
    multi = data.encode_conversation([("user", "<image>Hi"), ("assistant", "Hello"), ("user", "Bye"), ("assistant", "Ciao")])
    learned = [t for t, l in zip(multi["input_ids"], multi["labels"]) if l != -100]
    assert text.decode([t for t in learned if t != text.EOS]) == "HelloCiao" and learned.count(text.EOS) == 2
    prompt = text.encode(data.chat_prompt("<image>What colour?"), add_bos=True, add_eos=False)
    assert prompt == single["input_ids"][:len(prompt)] and single["labels"][len(prompt)] != -100
    with pytest.raises(ValueError, match="role must be"):
        data.encode_conversation([("system", "x")])


def test_loader_order_is_reproducible_and_independent_of_threads(folder):
    manifest = folder / "m.jsonl"
    manifest.write_text("\n".join(json.dumps({"image": f"img/{i % 6}.png", "text": f"sample {i}"}) for i in range(23)))
    def run(workers, seed=5):
        loader = data.Loader(manifest, batch_size=4, num_workers=workers, seed=seed, image_size=16)
        return [b for b in loader]
    one, three = run(1), run(3)
    assert len(one) == 6 and [len(b["indices"]) for b in one] == [4, 4, 4, 4, 4, 3]
    for a, b in zip(one, three):
        for key in a:
            assert torch.equal(a[key], b[key]), key
    order = torch.cat([b["indices"] for b in one]).tolist()
    assert sorted(order) == list(range(23)) and order != list(range(23))
    assert order != torch.cat([b["indices"] for b in run(1, seed=6)]).tolist()
    batch = one[0]
    assert batch["images"].shape == (4, 3, 16, 16) and batch["input_ids"].dtype == torch.long
    assert batch["padding_mask"].shape == batch["input_ids"].shape
    loader = data.Loader(manifest, batch_size=4, image_size=16)
    first, second = [b["indices"] for b in loader], [b["indices"] for b in loader]
    assert torch.cat(first).tolist() != torch.cat(second).tolist()  # a new permutation per epoch


def test_loader_bad_sample_policy(folder):
    (folder / "img" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    manifest = folder / "m.jsonl"
    manifest.write_text("\n".join(json.dumps({"image": p, "text": "t"}) for p in
                                  ["img/0.png", "img/corrupt.png", "img/1.png", "img/missing.png", "img/2.png"]))
    loader = data.Loader(manifest, batch_size=2, shuffle=False, bad_samples="skip", image_size=8)
    batches = list(loader)
    assert sum(len(b["indices"]) for b in batches) == 3 and loader.skipped == 2
    with pytest.raises(ValueError, match=r"record 1 \(source line 2, image '.*corrupt.png'\)"):
        list(data.Loader(manifest, batch_size=2, shuffle=False, image_size=8))


def test_loader_options_come_from_one_field_list(folder):
    """vlmkit.data.Loader's keywords and defaults are C++'s LoaderOptions (_C.Loader.defaults)."""
    import inspect
    manifest = folder / "m.jsonl"
    manifest.write_text(json.dumps({"image": "img/0.png", "text": "t"}))
    defaults = vlmkit._C.Loader.defaults
    params = inspect.signature(data.Loader).parameters
    assert {k: params[k].default for k in defaults} == defaults and defaults["batch_size"] == 8
    with pytest.raises(TypeError, match="unexpected option.*'batchsize'"):
        data.Loader(manifest, batchsize=4)
    with pytest.raises(TypeError, match="config key 'Loader.batch_size': expected an integer"):
        data.Loader(manifest, batch_size="4")
    with pytest.raises(ValueError, match="unknown bad_samples policy 'ignore'; expected one of 'raise', 'skip'"):
        data.Loader(manifest, bad_samples="ignore")
    with pytest.raises(ValueError, match="expected a non-negative integer"):
        data.Loader(manifest, seed=-1)


def test_loader_feeds_an_encoder_decoder(folder):
    dataset = data.SyntheticDataset(8, image_size=32, seed=0)
    dataset.write(str(folder / "synth"))
    loader = data.Loader(folder / "synth" / "manifest.jsonl", batch_size=4, image_size=32)
    model = vlmkit.build_model({"architecture": "encoder_decoder",
                                "image_encoder": {"image_size": 32, "patch_size": 8, "d_model": 32, "depth": 1},
                                "decoder": {"d_model": 32, "depth": 1, "max_len": 160}})
    batch = next(iter(loader))
    out = model(batch["images"], batch["input_ids"], batch["padding_mask"], batch["labels"])
    assert torch.isfinite(out.loss)


def test_loader_augmentation_is_seeded_and_text_aware(folder):
    image = np.zeros((16, 16, 3), np.uint8)
    image[:, :5] = [255, 0, 0]                      # red on the left only
    Image.fromarray(image).save(folder / "img" / "left.png")
    manifest = folder / "aug.jsonl"
    manifest.write_text("\n".join(json.dumps(e) for e in [
        {"image": "img/left.png", "text": "a red bar"},                                  # may flip
        {"image": "img/left.png", "question": "Is the bar on the left?", "answer": "yes"},  # must not
        {"image": "img/left.png", "text": "word", "ocr": "word"},                        # reads text: must not
    ]))
    plain = next(iter(data.Loader(manifest, batch_size=3, shuffle=False, image_size=16, normalize="none")))
    loader = data.Loader(manifest, batch_size=3, shuffle=False, image_size=16, normalize="none", flip_probability=1.0)
    flipped = next(iter(loader))["images"]
    assert torch.equal(flipped[0], plain["images"][0].flip(-1))
    assert torch.equal(flipped[1], plain["images"][1]) and torch.equal(flipped[2], plain["images"][2])
    def epoch_images(workers, epoch):
        l = data.Loader(manifest, batch_size=3, shuffle=False, image_size=16, num_workers=workers, crop_scale=0.3,
                        color_jitter=0.4, seed=9)
        l.epoch = epoch
        return next(iter(l))["images"]
    assert torch.equal(epoch_images(1, 0), epoch_images(3, 0))
    assert not torch.equal(epoch_images(1, 0), epoch_images(1, 1))
    with pytest.raises(ValueError, match="flip_probability"):
        data.Loader(manifest, flip_probability=2.0)


def test_sample_grid_with_texts(tmp_path):
    dataset = data.SyntheticDataset(6, image_size=64, seed=0)
    samples = [dataset[i] for i in range(6)]
    grid = data.save_grid([s["image"] for s in samples], [s["caption"] for s in samples], str(tmp_path / "grid.png"), 3)
    assert grid.shape == (2 * (128 + 34), 3 * 128, 3)
    assert torch.equal(data.load_image(tmp_path / "grid.png"), grid)


def test_letterbox_rewrites_coco_detection_answers_and_refuses_other_boxes(tmp_path):
    Image.new("RGB", (40, 20), (10, 20, 30)).save(tmp_path / "wide.png")
    coco = {"images": [{"id": 1, "file_name": "wide.png", "width": 40, "height": 20}],
            "annotations": [{"image_id": 1, "bbox": [0, 0, 20, 20], "category_id": 3}],
            "categories": [{"id": 3, "name": "cat"}]}
    (tmp_path / "instances.json").write_text(json.dumps(coco))
    for resize, box in (("square", [0, 0, 16, 32]), ("letterbox", [0, 8, 16, 24])):
        # letterbox: 40x20 -> 32x16 centred in 32x32 (8 rows of padding on top)
        loader = data.Loader(tmp_path / "instances.json", format="coco_instances", image_size=32, resize=resize,
                             shuffle=False, batch_size=1)
        batch = next(iter(loader))
        ids = batch["input_ids"][0][batch["labels"][0] != -100].tolist()
        answer = text.decode(ids)
        assert vlmkit.parse_boxes(answer, 32, 32)[0] == pytest.approx(box, abs=0.1), (resize, answer)
    (tmp_path / "m.jsonl").write_text(json.dumps({"image": "wide.png", "question": "Where?", "answer": "[0, 0, 500, 999]",
                                                  "boxes": [[0, 0, 20, 20]], "labels": ["cat"]}) + "\n")
    for resize in ("letterbox", "center_crop"):
        with pytest.raises(ValueError, match=f"source line 1 has boxes.*resize 'square' or 'dynamic'"):
            data.Loader(tmp_path / "m.jsonl", resize=resize)
    data.Loader(tmp_path / "m.jsonl", resize="dynamic")


def test_a_number_too_large_for_a_double_is_a_bad_line_not_a_crash(tmp_path):
    """Found by fuzz_datasets: nlohmann's number overflow (out_of_range 406) is not a
    parse_error and escaped the reader."""
    path = tmp_path / "big.jsonl"
    path.write_text('{"image": 33333333333E3333333333333333, "text": "a caption"}\n')
    with pytest.raises(ValueError, match="not valid JSON"):
        data.read_records(str(path), "jsonl")
    records, report = data.read_records(str(path), "jsonl", bad_samples="skip")
    assert records == [] and report["skipped"] == 1
