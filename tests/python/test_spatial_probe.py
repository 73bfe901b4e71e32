"""benchmarks/spatial_probe.py, behind docs/training.md's "Spatial questions": its
split must tell a model that compares places from one that guesses."""
import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "benchmarks"))
import spatial_probe  # noqa: E402
from vlmkit import data  # noqa: E402
from vlmkit.train_vlm import VALIDATION_SEED_OFFSET, scene_tasks  # noqa: E402

SIZE, SCENES = 64, 60


def spatial_questions():
    dataset = data.SyntheticDataset(SCENES, image_size=SIZE, seed=VALIDATION_SEED_OFFSET)
    return [(dataset[i], t) for i in range(SCENES) for t in scene_tasks(dataset[i]) if t["kind"] == "spatial"]


class Scripted:
    """Answers from a function of the question, in the order the probe asks."""

    def __init__(self, answers):
        self.answers = list(answers)

    def generate(self, images, prompts, budget, schema=None):
        out, self.answers = self.answers[:len(prompts)], self.answers[len(prompts):]
        return out


def test_right_answers_and_a_constant_answer_split_as_they_should():
    questions = spatial_questions()
    assert len(questions) > 20
    right = spatial_probe.spatial_breakdown(Scripted(t["answer"] for _, t in questions), SIZE, SCENES)
    assert right["questions"] == len(questions) and right["accuracy"] == 1.0
    assert all(row["accuracy"] == 1.0 for split in ("by_distance", "by_truth", "by_objects") for row in right[split].values())
    assert sum(row["questions"] for row in right["by_distance"].values()) == len(questions)
    assert set(right["answers"]) <= {"yes -> yes", "no -> no"}
    # Always "no": right exactly on the "no" questions, whatever the distance.
    never = spatial_probe.spatial_breakdown(Scripted("no" for _ in questions), SIZE, SCENES)
    assert never["by_truth"]["no"]["accuracy"] == 1.0 and never["by_truth"]["yes"]["accuracy"] == 0.0
    assert never["answers"]["yes -> no"] == right["by_truth"]["yes"]["questions"]
    # Wrong only where the objects are closer than 16 px: the split shows it.
    close = [("no" if t["answer"] == "yes" else "yes") if spatial_probe.centre_distance(t["question"], s["objects"]) < 16
             else t["answer"] for s, t in questions]
    near = spatial_probe.spatial_breakdown(Scripted(close), SIZE, SCENES)
    for bucket, row in near["by_distance"].items():
        assert row["accuracy"] == (0.0 if bucket in ("<8px", "8-16px") else 1.0), bucket


def test_centre_distance_reads_the_question():
    objects = [{"label": "red circle", "box": [0, 0, 10, 10]}, {"label": "blue square", "box": [30, 0, 50, 10]}]
    assert spatial_probe.centre_distance("Is the red circle left of the blue square?", objects) == 35
    with pytest.raises(ValueError, match="expected 'Is the <label> left of the <label>\\?'"):
        spatial_probe.centre_distance("What colour is the circle?", objects)
    with pytest.raises(ValueError, match="names an object the scene does not have"):
        spatial_probe.centre_distance("Is the red circle left of the green cross?", objects)
