"""The C++ Trainer from Python, checkpoints across languages, crash safety, DDP, predict."""
import json
import math
import os
import random
import signal
import subprocess
import sys
import time

import pytest

import torch

import vlmkit
from vlmkit import checkpoint, cli, data
from vlmkit.metrics import average_precision, bleu4, char_error_rate, retrieval_recall
from vlmkit.train_vlm import write_task_manifest

HERE = os.path.dirname(os.path.abspath(__file__))

TINY_VLM = {"architecture": "encoder_decoder",
            "image_encoder": {"type": "vit", "image_size": 32, "patch_size": 8, "d_model": 32, "depth": 1,
                              "num_heads": 2},
            "projector": {"type": "mlp"}, "fusion": "concat",
            "decoder": {"d_model": 32, "depth": 1, "num_heads": 2, "max_len": 256}}


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return write_task_manifest(str(tmp_path_factory.mktemp("tasks")), 4, 0, 32)


class Stop(Exception):
    pass


def _run(manifest, out, steps=12, stop_at=None, resume=False, **options):
    torch.manual_seed(0)
    model = vlmkit.build_model(TINY_VLM)
    loader = data.Loader(manifest, batch_size=4, num_workers=2, image_size=32, seed=0, drop_last=True,
                         color_jitter=0.1)
    trainer = vlmkit.Trainer(model, steps=steps, lr=1e-3, warmup_steps=2, log_every=1, checkpoint_every=3,
                             output_dir=str(out), **options)
    resumed = trainer.resume() if resume else False
    losses = []

    def log(record):
        if "loss" in record:
            losses.append(record["loss"])
            if stop_at is not None and record["step"] == stop_at:
                raise Stop()

    try:
        trainer.fit(loader, on_log=log)
    except Stop:
        pass
    return model, losses, resumed, trainer


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    return all(torch.equal(sa[k], sb[k]) for k in sa)


def test_resume_equals_uninterrupted(manifest, tmp_path):
    full, full_losses, _, _ = _run(manifest, tmp_path / "full")
    _, first, _, _ = _run(manifest, tmp_path / "cut", stop_at=8)  # checkpoints at 3 and 6
    rest, second, resumed, trainer = _run(manifest, tmp_path / "cut", resume=True)
    assert resumed and len(first) == 8 and len(second) == 6
    assert second == full_losses[6:]  # bit-identical losses after the resume
    assert _same_weights(full, rest)
    # 4 scenes give 27 examples: 6 batches of 4 per epoch, so the run crossed epochs.
    assert trainer.state["epoch"] >= 1


def test_trainer_options_are_checked(manifest):
    model = vlmkit.build_model(TINY_VLM)
    with pytest.raises(ValueError, match="matches no parameter"):
        vlmkit.Trainer(model, freeze=["vision_tower"])
    with pytest.raises(ValueError, match="unknown config key .Trainer.stepz"):
        vlmkit._C.Trainer(model.cpp_module, {"stepz": 3}, None)
    with pytest.raises(TypeError, match="has no built-in loss"):
        vlmkit.Trainer(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="group_lr"):
        vlmkit._C.Trainer(model.cpp_module, {"group_lr": [1]}, None)
    with pytest.raises(TypeError, match="unexpected option.*'stepz'.*the options are accumulation"):
        vlmkit.Trainer(model, stepz=3)
    with pytest.raises(TypeError, match="rank"):
        vlmkit.Trainer(model, rank=1)
    with pytest.raises(TypeError, match="betas or beta1/beta2"):
        vlmkit.Trainer(model, betas=(0.9, 0.95), beta1=0.8)
    # One field list (C++ TrainerOptions): the signature, the defaults and the record agree.
    import inspect
    defaults = vlmkit._C.Trainer.defaults
    params = inspect.signature(vlmkit.Trainer).parameters
    assert {k: params[k].default for k in defaults if k != "rank"} == {k: v for k, v in defaults.items() if k != "rank"}
    trainer = vlmkit.Trainer(model, freeze=["image_encoder", "decoder"], steps=2, betas=(0.8, 0.95))
    assert trainer.options == {**defaults, "freeze": ["image_encoder", "decoder"], "steps": 2,
                               "beta1": 0.8, "beta2": 0.95}
    assert trainer.trainable and all(n.startswith("projector.") for n in trainer.trainable)
    with pytest.raises(TypeError, match="expected each batch to be a dict of tensors, got int"):
        trainer.fit([1, 2, 3])


def test_checkpoint_files_are_verified(manifest, tmp_path):
    _run(manifest, tmp_path, steps=3)
    path = checkpoint.latest(str(tmp_path / "checkpoints"))
    assert path.endswith("step-00000003")
    sums = open(os.path.join(path, "SHA256SUMS")).read()
    assert "model.safetensors" in sums and "optimizer.safetensors" in sums and "trainer.json" in sums
    # `sha256sum -c` accepts the file as written.
    assert subprocess.run(["sha256sum", "-c", "--quiet", "SHA256SUMS"], cwd=path).returncode == 0
    weights = os.path.join(path, "model.safetensors")
    blob = bytearray(open(weights, "rb").read())
    blob[-3] ^= 0xFF
    open(weights, "wb").write(bytes(blob))
    with pytest.raises(ValueError, match="SHA-256"):
        checkpoint.load_model(path)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        checkpoint.load_model(str(tmp_path / "missing"))
    with open(weights, "wb") as f:  # truncated file
        f.write(bytes(blob[:100]))
    with pytest.raises(ValueError):
        checkpoint.load_model(path)


def test_checkpoint_of_another_architecture_is_refused(tmp_path):
    model = vlmkit.build_model(TINY_VLM)
    path = checkpoint.save(tmp_path, model)
    other = vlmkit.build_model({**TINY_VLM, "decoder": {**TINY_VLM["decoder"], "depth": 2}})
    with pytest.raises(ValueError, match="missing decoder.blocks.1"):
        checkpoint.load(path, other)


# A worker that trains and checkpoints every step; the test kills it at random moments.
KILL_WORKER = r"""
import sys, torch, vlmkit
from vlmkit import data
config, manifest, out = sys.argv[1:4]
import json
torch.manual_seed(0)
model = vlmkit.build_model(json.loads(config))
loader = data.Loader(manifest, batch_size=4, num_workers=2, image_size=32, seed=0, drop_last=True)
trainer = vlmkit.Trainer(model, steps=100, lr=1e-3, warmup_steps=2, log_every=1, checkpoint_every=1,
                         keep_checkpoints=2, output_dir=out)
trainer.resume()
trainer.fit(loader, on_log=lambda r: print("step", r["step"], flush=True) if "loss" in r else None)
print("finished", flush=True)
"""


def test_sigkill_at_random_moments_then_resume_equals_uninterrupted(manifest, tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(KILL_WORKER)
    config = json.dumps(TINY_VLM)

    def launch(out):
        return subprocess.Popen([sys.executable, str(script), config, manifest, str(out)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    reference = launch(tmp_path / "reference")
    assert "finished" in reference.communicate(timeout=300)[0]
    rng = random.Random(1234)
    out = tmp_path / "killed"
    for kill in range(4):
        proc = launch(out)
        # Kill a few steps after the resume point, at a random moment inside a
        # step (most of a step's time here is its checkpoint write).
        target, step = None, -1
        for line in proc.stdout:
            if line.startswith("step"):
                step = int(line.split()[1])
                target = target or step + rng.randint(3, 15)
                if step >= target:
                    break
        assert step > 0, proc.stderr.read()
        time.sleep(rng.uniform(0.0, 0.03))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        # Whatever the kill interrupted, the latest checkpoint is complete and verifies.
        latest = checkpoint.latest(str(out / "checkpoints"))
        checkpoint.Checkpoint(latest).verify()
        assert int(os.path.basename(latest).split("-")[1]) >= step - 1
    proc = launch(out)
    assert "finished" in proc.communicate(timeout=300)[0]
    final = checkpoint.load_model(str(out))
    expected = checkpoint.load_model(str(tmp_path / "reference"))
    assert _same_weights(final, expected)


def _tiny_loop(manifest, steps):
    """The notebook way: a plain torch.optim loop over the Loader."""
    torch.manual_seed(0)
    model = vlmkit.build_model(TINY_VLM)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    loader = data.Loader(manifest, batch_size=4, num_workers=1, image_size=32, seed=0, drop_last=True)
    loader._loader.start_epoch(0)
    for _ in range(steps):
        batch = loader._loader.next_batch()
        out = model(batch["images"], batch["input_ids"], batch["padding_mask"], batch["labels"])
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    return model, optimizer, loader


def test_python_loop_checkpoint_resumes_in_the_cpp_trainer(manifest, tmp_path):
    model, optimizer, loader = _tiny_loop(manifest, 3)
    path = checkpoint.save(tmp_path / "py", model, optimizer, step=3, epoch=0, batch_in_epoch=3)
    # One more step in Python...
    batch = loader._loader.next_batch()
    out = model(batch["images"], batch["input_ids"], batch["padding_mask"], batch["labels"])
    optimizer.zero_grad()
    out.loss.backward()
    optimizer.step()
    # ...equals one step of the C++ Trainer resumed from the Python checkpoint (constant lr, no clipping).
    torch.manual_seed(1)
    resumed_model = vlmkit.build_model(TINY_VLM)
    trainer = vlmkit.Trainer(resumed_model, steps=4, lr=1e-3, weight_decay=0.0, warmup_steps=0, min_lr_ratio=1.0,
                             clip_norm=0.0, log_every=0)
    assert trainer.resume(path)
    assert trainer.state["step"] == 3
    source = data.Loader(manifest, batch_size=4, num_workers=1, image_size=32, seed=0, drop_last=True)
    trainer.fit(source)
    for (name, a), b in zip(model.state_dict().items(), resumed_model.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5), name


def test_checkpoint_round_trip_python_cpp_identical_logits(manifest, tmp_path):
    model, optimizer, _ = _tiny_loop(manifest, 2)
    path = checkpoint.save(tmp_path, model, optimizer, step=2)
    images, ids = torch.randn(2, 3, 32, 32), torch.randint(8, 200, (2, 9))
    ids[:, 1] = 3  # <image>
    expected = model(images, ids).logits
    # The checkpoint reader and weight loader are C++ (vlmkit::Checkpoint, load_module_state)...
    loaded = checkpoint.load_model(path)
    assert torch.equal(loaded(images, ids).logits, expected)
    # ...and a C++ save (vlmkit::save_model) reads back in Python bit-identically.
    cpp_path = vlmkit.save_model(tmp_path / "cpp", loaded)
    assert torch.equal(checkpoint.load_model(cpp_path)(images, ids).logits, expected)


def test_cpp_example_captions_with_a_python_checkpoint(manifest, tmp_path):
    build = os.environ.get("VLMKIT_BUILD_DIR")
    if not build:
        pytest.skip("VLMKIT_BUILD_DIR is not set (make test sets it)")
    program = os.path.join(build, "tests", "cpp", "consumer", "build", "caption")
    assert os.path.exists(program), f"{program} missing: ctest's consumer_project builds it"
    model, _, _ = _tiny_loop(manifest, 5)
    path = checkpoint.save(tmp_path, model, step=5)
    image = os.path.join(os.path.dirname(manifest), "images", "000000.png")
    done = subprocess.run([program, path, image], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    caption_line, logits_line = done.stdout.rstrip("\n").rsplit("\n", 1)
    model.eval()
    pixels, _ = data.preprocess(image, 32, "square", normalize="clip")
    prompt = data.chat_prompt("<image>Describe the image.")
    assert caption_line == model.generate(pixels.unsqueeze(0), [prompt], 96)[0]
    ids = torch.tensor([vlmkit.ByteTokenizer().encode(prompt)])
    logits_sum = model(pixels.unsqueeze(0), ids).logits.sum().item()
    assert abs(float(logits_line.split()[1]) - logits_sum) <= 1e-4 * max(1.0, abs(logits_sum))
    bad = subprocess.run([program, str(tmp_path / "nothing"), image], capture_output=True, text=True)
    assert bad.returncode == 1 and "no checkpoint" in bad.stderr


DDP_WORKER = r"""
import json, os, sys, torch, torch.distributed as dist, vlmkit
from vlmkit import data
rank, world, manifest, out, port = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
if world > 1:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
torch.manual_seed(0)
model = vlmkit.build_model(json.loads(sys.argv[6]))
loader = data.Loader(manifest, batch_size=8 // world, num_workers=1, image_size=32, seed=0, drop_last=True,
                     rank=rank, world_size=world)
trainer = vlmkit.Trainer(model, steps=6, lr=2e-3, warmup_steps=0, log_every=0, output_dir=out)
trainer.fit(loader)
"""


def test_data_parallel_two_processes_equal_one(tmp_path):
    # Answers of one length: every rank holds the same number of answer tokens,
    # so the mean of the per-rank mean losses is the global mean.
    folder = tmp_path / "data"
    folder.mkdir()
    scenes = data.SyntheticDataset(16, image_size=32, seed=5)
    scenes.write(str(folder))
    entries = [json.loads(l) for l in open(folder / "manifest.jsonl")]
    with open(folder / "fixed.jsonl", "w") as f:
        for i, e in enumerate(entries):
            f.write(json.dumps({"image": e["image"], "question": "Colour?", "answer": ["red", "blu"][i % 2]}) + "\n")
    script = tmp_path / "ddp.py"
    script.write_text(DDP_WORKER)
    config = json.dumps(TINY_VLM)
    port = str(29600 + os.getpid() % 300)

    def run(world, out):
        procs = [subprocess.Popen([sys.executable, str(script), str(r), str(world), str(folder / "fixed.jsonl"),
                                   str(out), port, config], stderr=subprocess.PIPE, text=True)
                 for r in range(world)]
        for p in procs:
            _, err = p.communicate(timeout=300)
            assert p.returncode == 0, err

    run(1, tmp_path / "one")
    run(2, tmp_path / "two")
    one, two = checkpoint.load_model(str(tmp_path / "one")), checkpoint.load_model(str(tmp_path / "two"))
    start = vlmkit.build_model(TINY_VLM)
    moved = max((a - b).abs().max().item() for a, b in zip(one.state_dict().values(), start.state_dict().values()))
    assert moved > 1e-3  # training did change the weights
    for (name, a), b in zip(one.state_dict().items(), two.state_dict().values()):
        assert torch.allclose(a, b, atol=2e-5, rtol=1e-4), name


def test_predict_every_task_and_one_line_errors(manifest, tmp_path, capsys):
    model, _, _ = _tiny_loop(manifest, 2)
    run = tmp_path / "run"
    checkpoint.save(run, model, step=2)
    image = os.path.join(os.path.dirname(manifest), "images", "000001.png")
    for task in ("caption", "ocr", "detect", "extract"):
        assert cli.main(["predict", "--checkpoint", str(run), "--image", image, "--task", task,
                         "--max-new-tokens", "40", "--output", str(tmp_path / "boxes.png")]) == 0, task
        out = capsys.readouterr().out
        if task in ("detect", "extract"):
            assert json.loads(out), (task, out)  # constrained: always valid JSON
    assert (tmp_path / "boxes.png").exists()
    assert cli.main(["predict", "--checkpoint", str(run), "--image", image, "--task", "vqa",
                     "--prompt", "What colour is the circle?", "--max-new-tokens", "8"]) == 0
    capsys.readouterr()
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps({"type": "object", "properties": {"colour": {"enum": ["red", "blue"]}}}))
    assert cli.main(["predict", "--checkpoint", str(run), "--image", image, "--schema", str(schema)]) == 0
    assert json.loads(capsys.readouterr().out)["colour"] in ("red", "blue")
    for argv, message in (
            (["--checkpoint", str(tmp_path / "nope"), "--image", image], "no checkpoint"),
            (["--checkpoint", str(run), "--image", str(tmp_path / "nope.png")], "no image file"),
            (["--checkpoint", str(run), "--image", str(schema)], "could not decode"),
            (["--checkpoint", str(run), "--image", image, "--task", "vqa"], "needs --prompt"),
            (["--checkpoint", str(run), "--image", image, "--schema", str(tmp_path / "x.json")], "cannot read schema")):
        assert cli.main(["predict", *argv]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert cli.main(["eval", "--checkpoint", str(run), "--scenes", "1"]) == 0
    assert "extraction/valid_json" in capsys.readouterr().out


def test_metrics():
    assert char_error_rate("kitten", "sitting") == pytest.approx(3 / 7)
    assert bleu4(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(1.0)
    assert bleu4(["the cat"], ["the cat sat on the mat"]) == 0.0  # no 3- or 4-gram
    partial = bleu4(["a red circle and a blue square here"], ["a red circle and a blue square"])
    assert 0.7 < partial < 1.0
    truths = [(0, "cat", [0, 0, 10, 10]), (1, "cat", [5, 5, 15, 15])]
    assert average_precision([(0, "cat", [0, 0, 10, 10], 1.0), (1, "cat", [5, 5, 15, 15], 0.9)], truths) == 1.0
    half = average_precision([(0, "cat", [0, 0, 10, 10], 1.0), (1, "cat", [50, 50, 60, 60], 0.9)], truths)
    assert half == pytest.approx(0.5)
    # Catches AP that drops predictions with unknown or empty labels: ranked above the
    # right ones they are false positives of the class of the truth they cover.
    noisy = average_precision([(0, "", [0, 0, 10, 10], 2.0), (0, "cat", [0, 0, 10, 10], 1.0),
                               (1, "cat", [5, 5, 15, 15], 0.9)], truths)
    assert noisy == pytest.approx(2 / 3)
    recall = retrieval_recall(torch.eye(6) + 0.01 * torch.arange(6.0))
    assert recall["image_to_text_recall@1"] == 1.0 and recall["text_to_image_recall@5"] == 1.0
    with pytest.raises(ValueError, match="square"):
        retrieval_recall(torch.zeros(2, 3))
    # Catches recall that counts ties as hits: equal similarities carry no information.
    flat = retrieval_recall(torch.ones(8, 8))
    assert flat["image_to_text_recall@1"] == 0.0 and flat["text_to_image_recall@5"] == 0.0
    one_tie = torch.eye(4)
    one_tie[0, 1] = 1.0  # image 0 ties with text 1
    tied = retrieval_recall(one_tie, ks=(1, 2))
    assert tied["image_to_text_recall@1"] == 0.75 and tied["image_to_text_recall@2"] == 1.0
    with pytest.raises(ValueError, match="NaN"):
        retrieval_recall(torch.full((3, 3), float("nan")))


def test_trainer_with_a_python_loss_function(manifest):
    """Any model trains through vlmkit.Trainer given loss(batch) -> scalar."""
    torch.manual_seed(0)
    model = vlmkit.build_model(TINY_VLM)
    calls = []

    def loss(batch):
        calls.append(batch["images"].shape[0])
        out = model(batch["images"], batch["input_ids"], batch["padding_mask"], batch["labels"])
        return out.loss * 2.0

    loader = data.Loader(manifest, batch_size=4, num_workers=1, image_size=32, seed=0, drop_last=True)
    trainer = vlmkit.Trainer(model, steps=3, accumulation=2, log_every=0, loss=loss)
    summary = trainer.fit(loader)
    assert calls == [4] * 6 and summary["step"] == 3

    # The Trainer optimises the loss it is given, not the model's own: a trainer that
    # ignored `loss` would log the model's loss and move the weights under a zero loss.
    def logged_first_loss(loss_fn):
        torch.manual_seed(0)
        m = vlmkit.build_model(TINY_VLM)
        before = [p.detach().clone() for p in m.parameters()]
        records = []
        t = vlmkit.Trainer(m, steps=2, lr=1e-2, weight_decay=0.0, warmup_steps=0, log_every=1,
                           loss=None if loss_fn is None else (lambda b: loss_fn(m, b)))
        t.fit(data.Loader(manifest, batch_size=4, num_workers=1, image_size=32, seed=0, drop_last=True),
              on_log=records.append)
        moved = any(not torch.equal(a, p) for a, p in zip(before, m.parameters()))
        return [r["loss"] for r in records if "loss" in r][0], moved

    own, own_moved = logged_first_loss(None)
    tripled, _ = logged_first_loss(lambda m, b: 3.0 * m(b["images"], b["input_ids"], b["padding_mask"], b["labels"]).loss)
    zero, zero_moved = logged_first_loss(lambda m, b: 0.0 * m(b["images"], b["input_ids"], b["padding_mask"], b["labels"]).loss)
    assert tripled == pytest.approx(3.0 * own, rel=1e-5)
    assert zero == 0.0 and own_moved and not zero_moved
    bad = vlmkit.Trainer(model, steps=1, log_every=0, loss=lambda batch: torch.zeros(2))
    with pytest.raises(ValueError, match="must return a scalar"):
        bad.fit(loader)


def _regression(seed=0):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.BatchNorm1d(16), torch.nn.GELU(), torch.nn.Linear(16, 1))
    w = torch.randn(4, 1)

    def epoch(e):  # the same batches for the same epoch: what an exact resume needs
        g = torch.Generator().manual_seed(100 + e)
        for _ in range(5):
            x = torch.randn(8, 4, generator=g)
            yield {"images": x, "target": x @ w}
    return net, epoch


def test_trainer_trains_any_module_on_python_batches(tmp_path):
    """The one loop: a plain torch.nn.Module, batches as dicts from Python (extra keys
    reach the loss), its parameters and buffers trained and checkpointed in place."""
    net, epoch = _regression()
    seen, records = [], []

    def loss(b):
        seen.append(sorted(b))
        return torch.nn.functional.mse_loss(net(b["images"]), b["target"])
    trainer = vlmkit.Trainer(net, loss=loss, steps=40, lr=5e-2, warmup_steps=2, log_every=1,
                             output_dir=str(tmp_path), freeze=["3.bias"])
    last_bias = net[3].bias.detach().clone()
    summary = trainer.fit(epoch, on_log=records.append)
    losses = [r["loss"] for r in records if "loss" in r]
    assert seen[0] == ["images", "target"] and summary["samples"] == 40 * 8
    assert losses[-1] < losses[0] / 3  # it learns the linear map
    assert net.training and net[1].running_mean.abs().sum() > 0  # buffers updated in the module itself
    assert "3.bias" not in trainer.trainable and torch.equal(net[3].bias, last_bias)
    checkpoint = vlmkit._C.Checkpoint(summary["checkpoint"])
    weights, _ = checkpoint.read_tensors("model.safetensors")
    assert {"0.weight", "1.running_mean", "3.bias"} <= set(weights)
    assert torch.equal(weights["0.weight"], net[0].weight.detach())
    assert checkpoint.read_json("config.json") is None


def test_trainer_on_python_batches_resumes_exactly(tmp_path):
    def trained(stop_at=None, resume=False):
        net, epoch = _regression()
        trainer = vlmkit.Trainer(net, loss=lambda b: torch.nn.functional.mse_loss(net(b["images"]), b["target"]),
                                 steps=13, lr=1e-2, warmup_steps=2, log_every=1, output_dir=str(tmp_path),
                                 checkpoint_every=4)
        if resume:
            assert trainer.resume()
        records = []

        def on_log(r):
            records.append(r)
            if stop_at is not None and r.get("step") == stop_at:
                raise KeyboardInterrupt
        try:
            trainer.fit(epoch, on_log=on_log)
        except KeyboardInterrupt:
            pass
        return net, [r["loss"] for r in records if "loss" in r]

    full_net, full = trained()
    import shutil
    shutil.rmtree(tmp_path)
    trained(stop_at=9)  # checkpoints at steps 4 and 8 (8: in the second epoch of 5 batches)
    net, rest = trained(resume=True)
    assert rest == full[8:]  # bit-identical after the resume
    for a, b in zip(net.state_dict().values(), full_net.state_dict().values()):
        assert torch.equal(a, b)


def test_two_tower_and_two_leg_train_on_their_own_loss_and_a_collapse_is_reported(capsys):
    """Without loss=, the Trainer runs a Two-Tower or Two-Leg model's own loss from the
    batch names; a CLIP run stuck at ln(batch) with one text embedding says so once."""
    from vlmkit.train_two_tower import SMALL_CONFIG
    torch.manual_seed(0)
    model = vlmkit.build_model(SMALL_CONFIG)
    g = torch.Generator().manual_seed(0)
    ids, mask = vlmkit.text.encode_batch(["a red circle", "a blue square", "a green star", "a grey cross"], 32)
    batches = [{"images": torch.randn(4, 3, 32, 32, generator=g), "input_ids": ids, "padding_mask": mask}
               for _ in range(4)]
    summary = vlmkit.Trainer(model, steps=8, lr=1e-3, warmup_steps=1, log_every=0).fit(batches)
    assert summary["samples"] == 8 * 4 and math.isfinite(summary["loss"])
    # The same image and caption in every row: every logit equal, the loss exactly ln(4),
    # whatever the weights do; reported once, after the warmup and 20 steps of patience.
    same = [{"images": torch.zeros(4, 3, 32, 32), "input_ids": ids[:1].expand(4, -1).contiguous(),
             "padding_mask": mask[:1].expand(4, -1).contiguous()}]
    capsys.readouterr()
    vlmkit.Trainer(model, steps=30, lr=1e-3, warmup_steps=2, log_every=0).fit(same)
    lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith("collapse at step")]
    assert len(lines) == 1 and "ln(4)" in lines[0]
    leg = vlmkit.build_model({"architecture": "two_leg", "head": {"num_classes": 3},
                              "image_encoder": SMALL_CONFIG["image_encoder"], "text_encoder": SMALL_CONFIG["text_encoder"]})
    labelled = [dict(b, labels=torch.tensor([0, 1, 2, 1])) for b in batches]
    assert vlmkit.Trainer(leg, steps=4, log_every=0).fit(labelled)["samples"] == 16


def test_trainer_refuses_what_it_cannot_train_on():
    net, epoch = _regression()
    with pytest.raises(TypeError, match="no built-in loss"):
        vlmkit.Trainer(net, steps=1)
    with pytest.raises(TypeError, match="vlmkit model or a torch.nn.Module"):
        vlmkit.Trainer(object(), steps=1, loss=lambda b: b)
    trainer = vlmkit.Trainer(net, steps=2, log_every=0,
                             loss=lambda b: torch.nn.functional.mse_loss(net(b["images"]), b["target"]))
    with pytest.raises(TypeError, match="one-pass iterator"):
        trainer.fit(iter(list(epoch(0))))
    with pytest.raises(TypeError, match="re-iterable of batch dicts"):
        trainer.fit(42)
    with pytest.raises(TypeError, match="expected each batch to be a dict"):
        trainer.fit([(torch.zeros(8, 4), torch.zeros(8, 1))])
    with pytest.raises(TypeError, match=r"batch\['target'\] must be a tensor"):
        trainer.fit([{"images": torch.zeros(8, 4), "target": [0.0] * 8}])
    with pytest.raises(ValueError, match="no batch for a whole epoch"):
        trainer.fit([])
    # An exception inside the user's data comes out as itself.
    def broken(epoch):
        yield {"images": torch.zeros(8, 4), "target": torch.zeros(8, 1)}
        raise RuntimeError("disk gone")
    with pytest.raises(RuntimeError, match="disk gone"):
        trainer.fit(broken)


def test_trainer_bf16_autocast_trains_like_fp32_and_restores_autocast(manifest):
    """precision="bf16": forward and loss under bfloat16 autocast, float32 weights and
    AdamW state; the loss curve follows fp32's and autocast is off again afterwards."""
    curves = {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        model = vlmkit.build_model(TINY_VLM)
        loader = data.Loader(manifest, batch_size=4, num_workers=2, image_size=32, seed=0, drop_last=True)
        losses = []
        vlmkit.Trainer(model, steps=12, lr=3e-3, warmup_steps=2, log_every=1, precision=precision).fit(
            loader, on_log=lambda r: losses.append(r["loss"]) if "loss" in r else None)
        assert all(p.dtype == torch.float32 for p in model.parameters())
        curves[precision] = losses
    assert not torch.is_autocast_cpu_enabled()
    fp32, bf16 = curves["fp32"], curves["bf16"]
    assert bf16[-1] < bf16[0] - 0.5  # it trains
    assert max(abs(a - b) / a for a, b in zip(fp32, bf16)) < 0.03, (fp32, bf16)  # and like fp32
    with pytest.raises(ValueError, match="precision must be 'fp32' or 'bf16'"):
        vlmkit.Trainer(vlmkit.build_model(TINY_VLM), steps=1, precision="fp16")


def test_generation_under_bf16_autocast():
    torch.manual_seed(0)
    model = vlmkit.build_model(TINY_VLM).eval()
    images = torch.rand(2, 3, 32, 32)
    prompts = [data.chat_prompt("<image>What colour?"), data.chat_prompt("<image>Describe")]
    with torch.no_grad():
        ids, labels, mask = vlmkit.text.training_batch(["<image>q", "<image>q"], ["a", "b"])
        fp32 = model(images, ids, mask).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = model(images, ids, mask).logits
            texts = model.generate(images, prompts, 6)
            cached = model.generate(images, prompts, 6, return_ids=True)[1]
            uncached = model.generate(images, prompts, 6, use_cache=False, return_ids=True)[1]
    assert bf16.dtype == torch.bfloat16 and len(texts) == 2
    assert (bf16.float() - fp32).abs().max() < 0.05 * fp32.abs().max()
    assert all(1 <= len(row) <= 6 for row in cached) and len(uncached) == 2


def test_fused_adamw_steps_like_torch_adamw():
    from conftest import tiny_config
    torch.manual_seed(0)
    model = vlmkit.build_model(tiny_config("encoder_decoder"))
    twin = vlmkit.build_model(tiny_config("encoder_decoder"))
    twin.load_state_dict(model.state_dict())
    fused = vlmkit.FusedAdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.95), weight_decay=0.05)
    reference = torch.optim.AdamW(twin.parameters(), lr=2e-3, betas=(0.9, 0.95), weight_decay=0.05)
    images = torch.rand(2, 3, 32, 32)
    ids, labels, mask = vlmkit.text.training_batch(["<image>a", "<image>bc"], ["red", "blue"])
    for step in range(4):
        for m, opt in ((model, fused), (twin, reference)):
            opt.zero_grad()
            m(images, ids, mask, labels).loss.backward()
            opt.step()
        fused.lr = reference.param_groups[0]["lr"] = 2e-3 * (0.5 ** step)
    for (name, a), b in zip(model.state_dict().items(), twin.state_dict().values()):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), name
    assert fused.lr == pytest.approx(2e-3 * 0.125)
    with pytest.raises(ValueError, match="betas in"):
        vlmkit.FusedAdamW(model.parameters(), betas=(1.0, 0.9))
    with pytest.raises(ValueError, match="at least one parameter"):
        vlmkit.FusedAdamW([])


def test_fused_adamw_result_does_not_depend_on_the_threads():
    """The update runs on OpenMP's team under the bf16 policy (torch 2 / BLAS 1), on
    run_parallel's pool under fp32's (1 / 2) and on one thread with (1 / 1): every
    element is updated the same whichever thread runs it."""
    before = vlmkit.thread_info()
    g = torch.Generator().manual_seed(0)
    init = [torch.randn(300_000, generator=g), torch.randn(512, 128, generator=g)]  # 22 chunks of 16K
    grads = [[torch.randn(p.shape, generator=g) for p in init] for _ in range(3)]
    results = []
    try:
        for policy in [(1, 2), (2, 1), (1, 1)]:
            vlmkit.set_num_threads(*policy)
            params = [p.clone().requires_grad_() for p in init]
            opt = vlmkit.FusedAdamW(params, lr=1e-2, weight_decay=0.05)
            for step_grads in grads:
                for p, grad in zip(params, step_grads):
                    p.grad = grad.clone()
                opt.step()
            results.append([p.detach() for p in params])
    finally:
        vlmkit.set_num_threads(before["torch_threads"], before["blas_threads"])
    assert not torch.equal(results[0][0], init[0])
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


def test_task_weights_repeat_and_thin_examples_by_kind(manifest, tmp_path):
    from vlmkit.train_vlm import weighted_manifest
    lines = [json.loads(l) for l in open(manifest)]
    kinds = {k: sum(e["kind"] == k for e in lines) for k in {e["kind"] for e in lines}}
    assert weighted_manifest(manifest, {"caption": 1}, 0, str(tmp_path)) == manifest  # nothing to reweigh
    out = weighted_manifest(manifest, {"colour": 2, "detection": 0, "segment": 0.5}, 0, str(tmp_path))
    got = [json.loads(l) for l in open(out)]
    count = {k: sum(e["kind"] == k for e in got) for k in kinds}
    assert count["colour"] == 2 * kinds["colour"] and count["detection"] == 0
    assert count["caption"] == kinds["caption"] and 0 <= count["segment"] <= kinds["segment"]
    # The same draws from the same seed; the examples are the manifest's own.
    assert open(weighted_manifest(manifest, {"colour": 2, "detection": 0, "segment": 0.5}, 0, str(tmp_path))).read() \
        == open(out).read()
    assert all(e in lines for e in got)
    # Images stay where the manifest names them: the Loader reads the weighted file with its root.
    loader = data.Loader(out, image_root=os.path.dirname(manifest), batch_size=2, image_size=32)
    assert next(iter(loader))["images"].shape[0] == 2
    with pytest.raises(ValueError, match="kinds the data does not have: \\['colour2'\\]"):
        weighted_manifest(manifest, {"colour2": 2}, 0, str(tmp_path))
    # A default weight (may_be_absent) for a kind the data lacks weighs nothing, not an error.
    assert open(weighted_manifest(manifest, {"colour2": 2}, 0, str(tmp_path), may_be_absent={"colour2"})).read() \
        == open(manifest).read()
    assert open(weighted_manifest(manifest, {"colour2": 2, "colour": 2, "detection": 0, "segment": 0.5}, 0,
                                  str(tmp_path), may_be_absent={"colour2"})).read() == open(out).read()
    # A weight the user named (not in may_be_absent) must still find its kind.
    with pytest.raises(ValueError, match="kinds the data does not have: \\['colour3'\\]"):
        weighted_manifest(manifest, {"colour2": 2, "colour3": 2}, 0, str(tmp_path), may_be_absent={"colour2"})
    with pytest.raises(ValueError, match="must be a number in \\[0, 100\\]"):
        weighted_manifest(manifest, {"colour": -1}, 0, str(tmp_path))
    with pytest.raises(ValueError, match="leave no training examples"):
        weighted_manifest(manifest, {k: 0 for k in kinds}, 0, str(tmp_path))


def test_steps_whose_loss_is_not_finite_print_and_stop_with_one_clear_error(tmp_path, capsys):
    """A loss that is NaN every step: the progress line says so (it used to raise a
    TypeError formatting the missing loss), and the Trainer stops with its own error."""
    layer = torch.nn.Linear(2, 1)
    batches = [{"x": torch.ones(1, 2)}]
    trainer = vlmkit.Trainer(layer, loss=lambda b: layer(b["x"]).sum() * float("nan"), steps=20, log_every=1,
                             checkpoint_every=0, output_dir=str(tmp_path))
    with pytest.raises(ValueError, match="not finite for"):
        trainer.fit(batches)
    assert "loss not finite" in capsys.readouterr().out
