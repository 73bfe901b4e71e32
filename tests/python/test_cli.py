"""`vlmkit train` end to end on tiny budgets (the full run is `make train`)."""
import json

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
    assert cli.main(["train", "--architecture", "two_leg"]) == 2
