"""benchmarks/task_alone.py, behind docs/training.md's "One task alone": its
diagnostic task and its place fit must measure what they say."""
import json
import pathlib
import sys
import types

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "benchmarks"))
import task_alone  # noqa: E402
from vlmkit import data  # noqa: E402


def test_column_task_answers_the_quarter_holding_the_named_objects_centre():
    dataset = data.SyntheticDataset(40, image_size=64, seed=3)
    for i in range(len(dataset)):
        sample = dataset[i]
        task = task_alone.tasks_of(sample, i, "column")[0]
        label = task["question"][len("Which column is the "):-len(" in?")]
        (obj,) = [o for o in sample["objects"] if o["label"] == label]
        centre = (obj["box"][0] + obj["box"][2]) / 2
        assert int(task["answer"]) == min(3, int(centre // 16))
        assert task_alone.tasks_of(sample, i, "column") == [task]  # the same object every time
    # The dataset's own tasks pass through by kind.
    assert [t["kind"] for t in task_alone.tasks_of(dataset[0], 0, "shape")] == ["shape"]


class _Encoder:
    """Tokens on the 8 x 8 grid: each cell's column index (plus noise), or noise alone."""

    def __init__(self, place):
        self.place = place
        self.g = torch.Generator().manual_seed(0)

    def __call__(self, pixels):
        noise = torch.randn(1, 64, 4, generator=self.g)
        column = torch.arange(8.0).repeat(8).reshape(1, 64, 1)
        return types.SimpleNamespace(tokens=torch.cat([column, noise], -1) if self.place else noise)


def test_position_fit_reads_a_place_the_tokens_hold_and_not_one_they_do_not():
    placed = task_alone.position_fit(types.SimpleNamespace(image_encoder=_Encoder(True)), 64, 1, scenes=200)
    assert placed["r2"] > 0.9 and placed["mean_abs_error_px"] < 3
    blind = task_alone.position_fit(types.SimpleNamespace(image_encoder=_Encoder(False)), 64, 1, scenes=200)
    assert blind["r2"] < 0.2  # held out: a fit scored on its own data would read higher


def test_training_examples_from_the_manifests_match_the_rendered_scenes(tmp_path):
    # The training file is written from manifest.jsonl / tasks.jsonl without rendering
    # again: it must hold what the rendered scenes give (the validation side's path).
    from vlmkit.train_vlm import write_task_manifest
    write_task_manifest(str(tmp_path), 30, 2, 64)
    dataset = data.SyntheticDataset(30, image_size=64, seed=2)
    for task in ("column", "shape", "spatial"):
        with open(task_alone.write_task_examples(str(tmp_path), task, 2, 64)) as f:
            written = [json.loads(line) for line in f]
        expected = [t for i in range(30) for t in task_alone.tasks_of(dataset[i], 2 * 100_000 + i, task)]
        assert [{k: e[k] for k in ("kind", "question", "answer")} for e in written] == expected
        assert len(written) > 0
