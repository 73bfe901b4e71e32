"""`vlmkit train` end to end on tiny budgets (the full run is `make train`)."""
import json

import pytest
import torch

from vlmkit import cli
from vlmkit.train_vlm import VlmRun, evaluate, scene_tasks, train
from vlmkit import data


def test_scene_tasks_cover_every_task():
    sample = data.SyntheticDataset(30, seed=0)[next(i for i in range(30) if data.SyntheticDataset(30, seed=0)[i]["ocr"])]
    kinds = {t["kind"] for t in scene_tasks(sample)}
    assert {"caption", "colour", "shape", "count", "ocr", "detection", "segment", "extraction"} <= kinds
    detection = json.loads(next(t["answer"] for t in scene_tasks(sample) if t["kind"] == "detection"))
    assert detection["Object"] == [o["label"] for o in sample["objects"]]


def test_vlm_training_runs_and_reports_every_metric(tmp_path):
    metrics = train(VlmRun(train_scenes=40, steps=6, batch_size=8, eval_scenes=2, val_scenes=2, eval_every=3,
                           log_every=3, pretrain_steps=5),
                    out_dir=str(tmp_path),
                    verbose=False)
    for key in ("caption/exact_match", "colour/exact_match", "count/exact_match", "detection/mean_iou",
                "detection/valid_json", "extraction/valid_json", "extraction/field_accuracy",
                "colour/baseline", "shape/baseline", "count/baseline", "detection/valid_json_unconstrained",
                "segment/mean_iou", "segment/mask_map50", "segment/valid_json"):
        assert key in metrics, key
    assert (tmp_path / "tasks.png").exists()
    # Constrained decoding keeps the JSON tasks valid even after 6 steps.
    assert metrics["detection/valid_json"] == 1.0 and metrics["extraction/valid_json"] == 1.0
    assert (tmp_path / "checkpoints" / "latest").exists() and (tmp_path / "config.json").exists()
    assert (tmp_path / "loss.png").exists()
    log = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log if "loss" in e] == [1, 3, 6]
    # Validation metrics per task every eval_every steps (the progress a user watches).
    assert [e["step"] for e in log if "eval" in e] == [3, 6]
    assert log[-1]["step"] == 6 and "caption/bleu4" in log[-1]["eval"] and "shape/exact_match" in log[-1]["eval"]


def test_cli_two_tower(tmp_path, capsys):
    assert cli.main(["train", "--architecture", "two_tower", "--steps", "5", "--output", str(tmp_path)]) == 0
    assert "zero_shot_accuracy" in capsys.readouterr().out
    assert cli.main(["train", "--architecture", "two_tower", "--data", "digits", "--steps", "5",
                     "--output", str(tmp_path / "digits")]) == 0
    assert json.load(open(tmp_path / "digits" / "metrics.json"))["run"]["data"] == "digits"
    assert cli.main(["train", "--architecture", "two_tower", "--data", "photos.jsonl"]) == 2
    assert cli.main(["train", "--architecture", "two_leg", "--data", "digits", "--steps", "5",
                     "--output", str(tmp_path / "two_leg")]) == 0
    assert "is_it_even/accuracy" in json.load(open(tmp_path / "two_leg" / "metrics.json"))["metrics"]
    assert cli.main(["train", "--architecture", "encoder_text_decoder"]) == 2
    # The encoder-decoder's model options are refused, not ignored.
    assert cli.main(["train", "--architecture", "two_leg", "--qk-norm", "--depth", "2"]) == 2
    assert "--depth --qk-norm: options of the encoder-decoder's model" in capsys.readouterr().err


def test_dense_pretraining_targets_match_the_masks():
    from vlmkit.train_vlm import dense_targets
    dataset = data.SyntheticDataset(20, seed=3)
    colours, shapes = data.SyntheticDataset.colours, data.SyntheticDataset.shapes
    checked = widest_seen = 0
    for i in range(20):
        sample = dataset[i]
        classes, digits, ranks = dense_targets(sample, 8)
        masks = sample["masks"].float()
        for cell in range(64):
            r, c = divmod(cell, 8)
            share = masks[:, 8 * r:8 * r + 8, 8 * c:8 * c + 8].mean((1, 2))
            best = int(share.argmax())
            if share[best] >= 0.2:
                colour, shape = sample["objects"][best]["label"].split()
                assert classes[cell] == 1 + colours.index(colour) * len(shapes) + shapes.index(shape)
                box = sample["detection"]["Bounding_box"][best]
                assert digits[cell].tolist() == [v // 100 for v in box] + [v // 10 % 10 for v in box]
                # The width rank: 0 on the object whose colour the extraction's "Colour" field names.
                widths = [o["box"][2] - o["box"][0] for o in sample["objects"]]
                wider = sum(w > widths[best] or (w == widths[best] and k < best) for k, w in enumerate(widths))
                assert ranks[cell] == wider
                if wider == 0:
                    assert colour == sample["extraction"]["Colour"]
                    widest_seen += 1
                checked += 1
            else:
                assert classes[cell] == 0 and digits[cell].tolist() == [-1] * 8 and ranks[cell] == -1
    assert checked > 50 and widest_seen > 10


def test_pretrain_objectives():
    from vlmkit.models import EncoderDecoder
    from vlmkit.train_vlm import SMALL_VLM, pretrain_image_encoder
    import pytest
    torch.manual_seed(0)
    model = EncoderDecoder(SMALL_VLM)
    # The dense heads learn what lies under each token: from 0 on the object cells
    # (at first every cell reads as background) to twice the 1/24 of a guess and more
    # (0.12 in 40 steps, their loss weighing 0.1: DENSE_PRETRAIN_WEIGHTS).
    dense = pretrain_image_encoder(model, 300, 0, 40, verbose=False, objective="dense")
    assert dense["pretrain/token_class_accuracy"] > 0.08, dense
    assert "pretrain/token_rank_accuracy" not in dense
    # The width-rank head (VlmRun's default weighs it 0.1) reports its accuracy, and
    # its loss reaches the encoder: from the same start, the same three steps with and
    # without it leave different weights. A negative weight is refused by name.
    from vlmkit.train_vlm import VlmRun
    assert VlmRun.pretrain_rank_weight > 0
    encoders = {}
    for weight in (0.0, VlmRun.pretrain_rank_weight):
        torch.manual_seed(1)
        fresh = EncoderDecoder(SMALL_VLM)
        out = pretrain_image_encoder(fresh, 40, 0, 3, verbose=False, objective="dense", rank_weight=weight)
        assert ("pretrain/token_rank_accuracy" in out) == (weight > 0), out
        encoders[weight] = {k: v for k, v in fresh.state_dict().items() if k.startswith("image_encoder.")}
    moved = max((encoders[0.0][k] - encoders[VlmRun.pretrain_rank_weight][k]).abs().max().item() for k in encoders[0.0])
    assert moved > 1e-6, moved
    with pytest.raises(ValueError, match="rank_weight must be a finite number >= 0"):
        pretrain_image_encoder(model, 40, 0, 3, verbose=False, objective="dense", rank_weight=-1.0)
    with pytest.raises(ValueError, match="needs objective 'dense'"):
        pretrain_image_encoder(model, 40, 0, 3, verbose=False, objective="tags", rank_weight=0.1)
    tags = pretrain_image_encoder(model, 40, 0, 3, verbose=False)
    assert "pretrain/token_class_accuracy" not in tags and "pretrain/tag_f1" in tags
    # The F1 of each kind of tag, the word tags (what OCR reads) among them. Every tag
    # the scenes have is of exactly one kind, and the kinds read apart: after 40 steps
    # the colours are learnt (0.47) and the words are not yet (0.0).
    from vlmkit.train_vlm import TAG_KINDS, scene_tags
    scenes = data.SyntheticDataset(20, image_size=64, seed=0)
    for i in range(20):
        for tag in scene_tags(scenes[i]):
            assert sum(tag.startswith(prefix) for prefix in TAG_KINDS) == 1, tag
    for result in (dense, tags):
        assert {k[len("pretrain/tag_f1_"):] for k in result if k.startswith("pretrain/tag_f1_")} \
            == set(TAG_KINDS.values()), result
    assert dense["pretrain/tag_f1_colour"] > 0.3 > dense["pretrain/tag_f1_word"], dense
    with pytest.raises(ValueError, match="objective"):
        pretrain_image_encoder(model, 40, 0, 3, verbose=False, objective="boxes")


def test_pretrain_objective_defaults_to_the_runs(monkeypatch, tmp_path, capsys):
    """vlmkit train's stage 1 is VlmRun's (dense, with the width-rank head) unless
    --pretrain-objective or --pretrain-rank-weight names another."""
    from vlmkit import train_vlm
    assert VlmRun().pretrain_objective == "dense"
    runs = []
    monkeypatch.setattr(train_vlm, "train", lambda run, **kwargs: runs.append(run) or {})
    for flags, want in (([], "dense"), (["--pretrain-objective", "tags"], "tags"),
                        (["--pretrain-objective", "dense"], "dense")):
        assert cli.main(["train", "--output", str(tmp_path / "run")] + flags) == 0
        assert runs[-1].pretrain_objective == want, flags
        assert runs[-1].pretrain_rank_weight == VlmRun.pretrain_rank_weight == 0.1, flags
    assert cli.main(["train", "--output", str(tmp_path / "run"), "--pretrain-rank-weight", "0"]) == 0
    assert runs[-1].pretrain_rank_weight == 0.0
    with pytest.raises(SystemExit) as refused:  # argparse: "invalid choice: 'boxes'"
        cli.main(["train", "--pretrain-objective", "boxes"])
    assert refused.value.code == 2
    # The width-rank head's weight: a number >= 0, and only for the dense stage 1.
    assert cli.main(["train", "--pretrain-rank-weight", "-0.1"]) == 2
    assert "--pretrain-rank-weight must be a finite number >= 0" in capsys.readouterr().err
    assert cli.main(["train", "--pretrain-rank-weight", "nan"]) == 2
    assert "--pretrain-rank-weight must be a finite number >= 0" in capsys.readouterr().err
    assert cli.main(["train", "--pretrain-objective", "tags", "--pretrain-rank-weight", "0.1"]) == 2
    assert "--pretrain-objective tags has none" in capsys.readouterr().err


def test_encoder_lr_sets_the_image_encoders_rate(tmp_path, capsys):
    """--encoder-lr trains an unfrozen image encoder at its own rate: at 1e-9 it
    stays where it was while the decoder moves at the run's rate."""
    from vlmkit import checkpoint
    from vlmkit.models import EncoderDecoder
    from vlmkit.train_vlm import SMALL_VLM

    train(VlmRun(train_scenes=20, steps=3, batch_size=8, eval_scenes=1, val_scenes=0, pretrain_steps=0,
                 freeze=(), encoder_lr=1e-9, warmup=1, lr=1e-2),
          out_dir=str(tmp_path / "run"), verbose=False)
    torch.manual_seed(0)  # train() seeds the same initial weights
    start = EncoderDecoder(SMALL_VLM).state_dict()
    trained = checkpoint.load_model(str(tmp_path / "run")).state_dict()
    moved = {k: (trained[k] - start[k]).abs().max().item() for k in start}
    assert max(v for k, v in moved.items() if k.startswith("image_encoder.")) < 1e-6
    assert max(v for k, v in moved.items() if k.startswith("decoder.")) > 1e-3
    assert cli.main(["train", "--encoder-lr", "-1", "--output", str(tmp_path / "bad")]) == 2
    assert "--encoder-lr must be >= 0" in capsys.readouterr().err
    assert cli.main(["train", "--warmup", "-5", "--output", str(tmp_path / "bad")]) == 2
    assert "--warmup must be >= 0" in capsys.readouterr().err
    assert cli.main(["train", "--decay-fraction", "1.5", "--output", str(tmp_path / "bad")]) == 2
    assert "--decay-fraction must be in (0, 1]" in capsys.readouterr().err
    # A rate for a frozen encoder would do nothing: refused by name.
    with pytest.raises(ValueError, match="applies only when the image encoder trains"):
        train(VlmRun(train_scenes=20, steps=1, encoder_lr=1e-4), out_dir=str(tmp_path / "frozen"), verbose=False)


def test_decay_fraction_holds_the_rate_then_decays(monkeypatch, tmp_path):
    """--decay-fraction reaches the VLM stage's Trainer: the rate holds at --lr, then
    the cosine runs over the last share of the steps (the logged lr is the step's)."""
    from vlmkit import train_vlm
    for fraction, want in ((0.5, [1.0, 1.0, 1.0, 0.5]), (1.0, [1.0, 0.8536, 0.5, 0.1464])):
        out = tmp_path / f"run{fraction}"
        train(VlmRun(train_scenes=20, steps=4, batch_size=8, eval_scenes=1, val_scenes=0, pretrain_steps=0,
                     warmup=0, lr=1e-2, log_every=1, decay_fraction=fraction), out_dir=str(out), verbose=False)
        lrs = [r["lr"] for r in map(json.loads, open(out / "metrics.jsonl")) if "loss" in r]
        assert lrs == pytest.approx([1e-2 * w for w in want], rel=1e-3), fraction
    runs = []
    monkeypatch.setattr(train_vlm, "train", lambda run, **kwargs: runs.append(run) or {})
    assert cli.main(["train", "--output", str(tmp_path / "run")]) == 0
    assert runs[-1].decay_fraction == VlmRun.decay_fraction == 0.2  # warmup-stable-decay, the default
    assert cli.main(["train", "--decay-fraction", "1", "--output", str(tmp_path / "run")]) == 0
    assert runs[-1].decay_fraction == 1.0


def test_task_weights_default_to_the_datas_and_the_flag_changes_named_kinds(monkeypatch, tmp_path):
    """The synthetic scenes train with SYNTHETIC_TASK_WEIGHTS; a tasks file with every
    kind at 1; --task-weights changes the kinds it names and '' resets all."""
    from vlmkit import train_vlm
    from vlmkit.train_vlm import SYNTHETIC_TASK_WEIGHTS, run_task_weights
    assert SYNTHETIC_TASK_WEIGHTS == {"spatial": 2.0, "detection": 2.0, "segment": 1.5, "count": 0.5, "ocr": 0.5}
    assert run_task_weights(VlmRun()) == SYNTHETIC_TASK_WEIGHTS
    assert run_task_weights(VlmRun(data="tasks.jsonl")) == {}
    assert run_task_weights(VlmRun(task_weights={"detection": 2})) == {"detection": 2}
    runs = []
    monkeypatch.setattr(train_vlm, "train", lambda run, **kwargs: runs.append(run) or {})
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text("")
    defaults = SYNTHETIC_TASK_WEIGHTS
    for flags, want in (([], defaults), (["--task-weights", "detection=3"], {**defaults, "detection": 3.0}),
                        (["--task-weights", "spatial=1,caption=2"], {**defaults, "spatial": 1.0, "caption": 2.0}),
                        (["--task-weights", ""], {}),
                        (["--data", str(tasks)], {}), (["--data", str(tasks), "--task-weights", "caption=2"], {"caption": 2.0})):
        assert cli.main(["train", "--output", str(tmp_path / "run")] + flags) == 0
        assert run_task_weights(runs[-1]) == want, flags
    assert cli.main(["train", "--task-weights", "spatial"]) == 2


def test_segment_every_object_adds_one_outline_per_object(monkeypatch, tmp_path):
    """--segment-every-object (the default on the synthetic scenes): the training
    manifest asks to segment every object of a scene, the scene's own question first
    and unchanged; --no-segment-every-object asks one; a tasks file refuses the option
    rather than ignore it."""
    from vlmkit import train_vlm
    one = train_vlm.write_task_manifest(str(tmp_path / "scenes"), 12, 3, 64)
    every = train_vlm.write_task_manifest(str(tmp_path / "scenes"), 12, 3, 64, every_object=True)
    assert one == train_vlm.task_manifest_path(str(tmp_path / "scenes"))
    assert every == train_vlm.task_manifest_path(str(tmp_path / "scenes"), every_object=True) != one
    dataset = data.SyntheticDataset(12, image_size=64, seed=3)
    rows = [json.loads(line) for line in open(every)]
    base = [json.loads(line) for line in open(one)]
    assert [r for r in rows if r["kind"] != "segment"] == [r for r in base if r["kind"] != "segment"]
    by_image = {}
    for r in rows:
        if r["kind"] == "segment":
            by_image.setdefault(r["image"], []).append(r)
    assert len(by_image) == 12
    for i, mine in enumerate(by_image.values()):  # scenes in order
        sample = dataset[i]
        assert mine[0]["question"] == sample["segment"]["question"] and mine[0]["answer"] == sample["segment"]["answer"]
        # The added answers are written as the C++ writes the scene's own, byte for byte.
        own = sample["segmentation"]["Object"].index(sample["segment"]["question"][len("Segment the "):-1])
        assert train_vlm.segment_answer(sample["segmentation"]["Object"][own],
                                        sample["segmentation"]["Polygon"][own]) == sample["segment"]["answer"]
        assert sorted(r["question"] for r in mine) == sorted(f"Segment the {o['label']}." for o in sample["objects"])
        for r in mine:
            value = json.loads(r["answer"])
            k = sample["segmentation"]["Object"].index(value["Object"][0])
            assert value["Polygon"] == [sample["segmentation"]["Polygon"][k]]
    assert sum(r["kind"] == "segment" for r in base) == 12
    # On by default for the synthetic scenes, off for a tasks file; the flag turns it off.
    assert train_vlm.run_segment_every_object(VlmRun()) is True
    assert train_vlm.run_segment_every_object(VlmRun(data=one)) is False
    runs = []
    monkeypatch.setattr(train_vlm, "train", lambda run, **kwargs: runs.append(run) or {})
    for flags, want in (([], True), (["--segment-every-object"], True), (["--no-segment-every-object"], False)):
        assert cli.main(["train", "--output", str(tmp_path / "run")] + flags) == 0
        assert train_vlm.run_segment_every_object(runs[-1]) is want, flags
    monkeypatch.undo()
    with pytest.raises(ValueError, match="segment_every_object applies to the synthetic scenes"):
        train_vlm.run_segment_every_object(VlmRun(data=one, segment_every_object=True))
    with pytest.raises(ValueError, match="segment_every_object applies to the synthetic scenes"):
        train(VlmRun(data=one, segment_every_object=True, steps=1), out_dir=str(tmp_path / "refused"))


def test_spatial_every_pair_asks_both_orders_of_every_pair_apart(monkeypatch, tmp_path):
    """--spatial-every-pair: a spatial question for every ordered pair of objects whose
    centres are >= 4 px apart, answered from the boxes; the scene's own examples first
    and unchanged; refused with a tasks file."""
    from vlmkit import train_vlm
    dataset = data.SyntheticDataset(40, image_size=64, seed=5)
    added = 0
    for i in range(40):
        sample = dataset[i]
        base = train_vlm.scene_tasks(sample)
        tasks = train_vlm.scene_tasks(sample, every_pair=True)
        assert tasks[:len(base)] == base
        extra = tasks[len(base):]
        added += len(extra)
        centre = {o["label"]: (o["box"][0] + o["box"][2]) / 2 for o in sample["objects"]}
        pairs = {(a, b) for a in centre for b in centre if a != b and abs(centre[a] - centre[b]) >= 4}
        asked = set()
        for t in [t for t in tasks if t["kind"] == "spatial"]:
            a, b = t["question"][len("Is the "):-1].split(" left of the ")
            assert t["answer"] == ("yes" if centre[a] < centre[b] else "no")
            asked.add((a, b))
        assert asked == pairs and len(asked) == sum(t["kind"] == "spatial" for t in tasks)
        assert all(t["kind"] == "spatial" for t in extra)
    assert added > 20
    manifest = train_vlm.write_task_manifest(str(tmp_path / "scenes"), 6, 5, 64, every_pair=True)
    assert manifest.endswith("tasks-every-pair.jsonl")
    assert train_vlm.task_manifest_path("d", True, True).endswith("tasks-every-object-every-pair.jsonl")
    # Off by default; the flag turns it on; a tasks file refuses it.
    assert train_vlm.run_spatial_every_pair(VlmRun()) is False
    runs = []
    monkeypatch.setattr(train_vlm, "train", lambda run, **kwargs: runs.append(run) or {})
    for flags, want in (([], False), (["--spatial-every-pair"], True), (["--no-spatial-every-pair"], False)):
        assert cli.main(["train", "--output", str(tmp_path / "run")] + flags) == 0
        assert train_vlm.run_spatial_every_pair(runs[-1]) is want, flags
    monkeypatch.undo()
    with pytest.raises(ValueError, match="spatial_every_pair applies to the synthetic scenes"):
        train(VlmRun(data=manifest, spatial_every_pair=True, steps=1), out_dir=str(tmp_path / "refused"))


def test_qk_norm_flag_normalises_every_decoder_attention(monkeypatch, tmp_path, capsys):
    """The small VLM has an RMSNorm of queries and keys in every decoder attention
    (self- and cross-attention layers both carry the norms); without a flag the model
    is the small VLM's; --no-qk-norm leaves the norms out; --from refuses the flag (the
    checkpoint's model is used)."""
    from vlmkit import train_vlm
    from vlmkit.models import EncoderDecoder
    configs = []
    monkeypatch.setattr(train_vlm, "train", lambda run, config=None, **kwargs: configs.append(config) or {})
    for flags, want in (([], True), (["--no-qk-norm"], False), (["--qk-norm"], True)):
        assert cli.main(["train", "--output", str(tmp_path / "run")] + flags) == 0
        assert configs[-1]["decoder"].get("qk_norm", False) is want, flags
    assert configs[0] == train_vlm.SMALL_VLM
    names = [n for n, _ in EncoderDecoder(configs[0]).named_parameters()]
    assert sum(n.endswith(("self_attn.q_norm.weight", "cross_attn.k_norm.weight")) for n in names) == 8
    assert not any("q_norm" in n for n, _ in EncoderDecoder(configs[1]).named_parameters())
    assert cli.main(["train", "--from", str(tmp_path / "run"), "--qk-norm", "--output", str(tmp_path / "b")]) == 2
    assert "--qk-norm" in capsys.readouterr().err
