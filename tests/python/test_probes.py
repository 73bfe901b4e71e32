"""benchmarks/probes.py, the measurements behind docs/training.md's "Causes":
its probe and its bookkeeping must measure what they say."""
import json
import pathlib
import sys

import pytest
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "benchmarks"))
import probes  # noqa: E402


def test_logistic_probe_reads_what_is_linearly_there_and_nothing_else():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (600,), generator=g)
    noise = torch.randn(600, 16, generator=g)
    readable = noise.clone()
    readable[:, :4] += 4 * torch.nn.functional.one_hot(labels, 4)
    assert probes.logistic_probe(readable[:400], labels[:400], readable[400:], labels[400:], 4) > 0.95
    # Labels the features do not carry: held-out accuracy near chance (catches a probe scored on its fit data).
    assert probes.logistic_probe(noise[:400], labels[:400], noise[400:], labels[400:], 4) < 0.4


def test_task_shares_count_label_tokens_and_padding(tmp_path):
    from PIL import Image
    Image.new("RGB", (32, 32), (90, 90, 90)).save(tmp_path / "a.png")
    examples = [("caption", "a red circle"), ("shape", "circle"), ("shape", "square"), ("count", "2")]
    with open(tmp_path / "tasks.jsonl", "w") as f:
        for kind, answer in examples:
            f.write(json.dumps({"image": "a.png", "kind": kind, "question": "Q?", "answer": answer}) + "\n")
    out = probes.task_shares(str(tmp_path), 32, batch_size=2, batches=2)
    tokens = {k: 0 for k, _ in examples}
    for kind, answer in examples:
        tokens[kind] += len(answer.encode()) + 1  # byte tokens + <eos>
    total = sum(tokens.values())
    assert out["label_tokens"] == pytest.approx({k: v / total for k, v in tokens.items()})
    assert out["examples"]["shape"] == 0.5
    assert out["label_tokens_per_example"]["shape"] == pytest.approx((len("circle") + len("square") + 2) / 2)
    assert out["padded_text_positions"] > 0.0  # "a red circle" beside "2" in some batch


def test_task_shares_see_no_padding_when_every_example_has_the_same_length(tmp_path):
    # Catches a padding share computed from the wrong side of the mask (it would read 1.0 here).
    from PIL import Image
    Image.new("RGB", (32, 32), (90, 90, 90)).save(tmp_path / "a.png")
    with open(tmp_path / "tasks.jsonl", "w") as f:
        for answer in ("red", "tea", "dog", "sun"):
            f.write(json.dumps({"image": "a.png", "kind": "ocr", "question": "Q?", "answer": answer}) + "\n")
    assert probes.task_shares(str(tmp_path), 32, batch_size=2, batches=2)["padded_text_positions"] == 0.0


def test_task_shares_read_the_every_object_examples_file_of_a_default_run(tmp_path):
    """A run's scenes folder holds the examples file it trained on
    (tasks-every-object[-every-pair].jsonl), which task_shares reads before
    tasks.jsonl; none is an error."""
    from PIL import Image
    Image.new("RGB", (32, 32), (90, 90, 90)).save(tmp_path / "a.png")
    for name, kind in (("tasks.jsonl", "caption"), ("tasks-every-object.jsonl", "segment")):
        with open(tmp_path / name, "w") as f:
            f.write(json.dumps({"image": "a.png", "kind": kind, "question": "Q?", "answer": "x"}) + "\n")
    assert probes.task_shares(str(tmp_path), 32, batch_size=1, batches=1)["examples"] == {"segment": 1.0}
    with open(tmp_path / "tasks-every-object-every-pair.jsonl", "w") as f:
        f.write(json.dumps({"image": "a.png", "kind": "spatial", "question": "Q?", "answer": "x"}) + "\n")
    assert probes.task_shares(str(tmp_path), 32, batch_size=1, batches=1)["examples"] == {"spatial": 1.0}
    with pytest.raises(FileNotFoundError, match="no examples file"):
        probes.task_shares(str(tmp_path / "empty"), 32)


def test_question_errors_split_misses_into_another_objects_and_absent():
    from vlmkit import data
    from vlmkit.train_vlm import VALIDATION_SEED_OFFSET, scene_tasks
    scenes = 12
    dataset = data.SyntheticDataset(scenes, image_size=32, seed=VALIDATION_SEED_OFFSET)
    asked = [(t, dataset[i]) for i in range(scenes) for t in scene_tasks(dataset[i]) if t["kind"] in ("colour", "shape")]

    class Scripted:
        """Answers from a list, in the order the probe asks."""
        def __init__(self, answers):
            self.answers = list(answers)

        def generate(self, images, prompts, budget):
            out, self.answers = self.answers[:len(prompts)], self.answers[len(prompts):]
            return out

    right = probes.question_errors(Scripted(t["answer"] for t, _ in asked), 32, scenes)
    assert right["colour"]["right"] + right["shape"]["right"] == len(asked)
    assert set(right["colour"]["by_objects"].values()) == {1.0}
    # The first object's attribute: right when the question names it, else another object's.
    first = [s["objects"][0]["label"].split()[0 if t["kind"] == "colour" else 1] for t, s in asked]
    mixed = probes.question_errors(Scripted(first), 32, scenes)
    wrong = sum(a != t["answer"] for a, (t, _) in zip(first, asked))
    assert wrong > 0 and mixed["colour"]["another_object"] + mixed["shape"]["another_object"] == wrong
    assert mixed["colour"]["absent"] == mixed["shape"]["absent"] == 0
    absent = probes.question_errors(Scripted(["nothing"] * len(asked)), 32, scenes)
    assert absent["colour"]["absent"] + absent["shape"]["absent"] == len(asked)
