"""LoRA adapters: identity at attach, merge == unmerged, targets, freezing, the
C++ Trainer and torch.optim, exact resume, PEFT-style adapter folders, whole
checkpoints, the CLI, and a fine-tune that learns a new question."""
import json
import os

import pytest
import torch

import vlmkit
from vlmkit import checkpoint, cli, data, lora
from conftest import batch, tiny_config

from test_training import TINY_VLM

ARCHITECTURES = ["two_tower", "two_leg", "encoder_decoder", "encoder_text_decoder"]


def _inputs(arch):
    images, ids = batch(3)
    if arch in ("encoder_decoder", "encoder_text_decoder"):
        ids[:, 0] = 1
        ids[:, 1] = 3  # <image>
    return images, ids


def _output(model, arch, images, ids):
    out = model(images, ids, ids) if arch == "encoder_text_decoder" else model(images, ids)
    return out.logits if hasattr(out, "logits") and out.logits is not None else out.logits_per_image


def _perturb_adapters(model, std=0.05):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, std)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_attach_changes_nothing_and_merged_equals_unmerged(arch):
    model = vlmkit.build_model(tiny_config(arch)).eval().to(torch.float64)
    images, ids = _inputs(arch)
    images = images.double()
    base = _output(model, arch, images, ids)
    adapted = lora.apply(model, rank=4, alpha=8)
    assert adapted and all(n.endswith(("q_proj", "k_proj", "v_proj", "out_proj")) for n in adapted)
    torch.testing.assert_close(_output(model, arch, images, ids), base, rtol=0, atol=0)  # B = 0
    _perturb_adapters(model)
    unmerged = _output(model, arch, images, ids)
    assert (unmerged - base).abs().max() > 0.05 * base.abs().max()  # the adapters do something
    lora.merge(model)
    assert lora.merged(model)
    torch.testing.assert_close(_output(model, arch, images, ids), unmerged, rtol=0, atol=1e-6)
    lora.unmerge(model)
    torch.testing.assert_close(_output(model, arch, images, ids), unmerged, rtol=0, atol=1e-6)
    # Removing with merge keeps the function and gives the base architecture's state dict.
    lora.remove(model, merge=True)
    assert lora.layers(model) == [] and not any("lora_" in k for k in model.state_dict())
    torch.testing.assert_close(_output(model, arch, images, ids), unmerged, rtol=0, atol=1e-6)
    plain = vlmkit.build_model(tiny_config(arch))
    plain.load_state_dict(model.state_dict())
    assert all(p.requires_grad for p in model.parameters())


def test_targets_select_by_suffix_and_wildcard_and_refuse_unknown():
    model = vlmkit.build_model(TINY_VLM)
    chosen = lora.apply(model, rank=2, target_modules=["decoder.*_proj"])
    assert chosen and all(n.startswith("decoder.") and n.endswith("_proj") for n in chosen)
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all(".lora_" in n for n in trainable) and len(trainable) == 2 * len(chosen)
    assert all(".lora_" not in n for n in frozen)
    with pytest.raises(ValueError, match="has LoRA adapters already"):
        lora.apply(model)
    with pytest.raises(ValueError, match=r"selects no Linear layer.*q_proj"):
        lora.apply(vlmkit.build_model(TINY_VLM), target_modules=["attention.query"])
    with pytest.raises(ValueError, match="rank must be >= 1"):
        lora.apply(vlmkit.build_model(TINY_VLM), rank=0)
    with pytest.raises(TypeError, match="vlmkit model"):
        lora.apply(torch.nn.Linear(2, 2))
    match = vlmkit._C.lora_target_matches
    assert match("q_proj", "decoder.blocks.0.self_attn.q_proj")
    assert match("self_attn.q_proj", "decoder.blocks.0.self_attn.q_proj")
    assert not match("attn.q_proj", "decoder.blocks.0.self_attn.q_proj")  # whole components only
    assert match("decoder.blocks.*.fc1", "decoder.blocks.3.fc1")
    assert not match("fc1", "decoder.blocks.0.fc10")


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    from vlmkit.train_vlm import write_task_manifest
    return write_task_manifest(str(tmp_path_factory.mktemp("tasks")), 4, 0, 32)


def _lora_trainer(manifest, out, steps, base_state=None):
    torch.manual_seed(0)
    model = vlmkit.build_model(TINY_VLM)
    if base_state is not None:
        model.load_state_dict(base_state)
    lora.apply(model, rank=4, target_modules=["q_proj", "v_proj", "fc1"])
    loader = data.Loader(manifest, batch_size=4, num_workers=2, image_size=32, seed=0, drop_last=True)
    trainer = vlmkit.Trainer(model, steps=steps, lr=3e-3, warmup_steps=1, log_every=1, checkpoint_every=3,
                             output_dir=str(out))
    return model, loader, trainer


def test_cpp_trainer_changes_only_adapters_and_resumes_exactly(manifest, tmp_path):
    base = {k: v.clone() for k, v in vlmkit.build_model(TINY_VLM).state_dict().items()}
    model, loader, trainer = _lora_trainer(manifest, tmp_path / "full", 6, base)
    assert trainer.trainable and all(".lora_" in n for n in trainer.trainable)
    trainer.fit(loader, on_log=lambda r: None)
    after = model.state_dict()
    for name, value in after.items():
        if ".lora_" in name:
            if ".lora_B." in name:
                assert not torch.equal(value, torch.zeros_like(value)), name
        else:
            assert torch.equal(value, base[name]), name
    # Interrupted after the step-3 checkpoint, then resumed: the same adapters bit for bit.
    cut, loader2, trainer2 = _lora_trainer(manifest, tmp_path / "cut", 6, base)

    def stop(record):
        if record.get("step") == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        trainer2.fit(loader2, on_log=stop)
    resumed, loader3, trainer3 = _lora_trainer(manifest, tmp_path / "cut", 6, base)
    assert trainer3.resume()
    trainer3.fit(loader3, on_log=lambda r: None)
    for name, value in after.items():
        assert torch.equal(resumed.state_dict()[name], value), name
    # The run's checkpoint describes its adapters: load_model rebuilds them.
    loaded = checkpoint.load_model(str(tmp_path / "full"))
    assert lora.layers(loaded) == lora.layers(model)
    images, ids = _inputs("encoder_decoder")
    model.eval()
    torch.testing.assert_close(loaded.eval()(images, ids).logits, model(images, ids).logits, rtol=0, atol=0)


def test_torch_optim_trains_adapters_and_python_checkpoints_keep_them(tmp_path):
    model = vlmkit.build_model(TINY_VLM)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    lora.apply(model, rank=4)
    opt = torch.optim.AdamW(lora.trainable_parameters(model), lr=1e-2)
    images, ids = _inputs("encoder_decoder")
    labels = ids.clone()
    labels[:, :3] = -100
    for _ in range(3):
        opt.zero_grad()
        model(images, ids, None, labels).loss.backward()
        opt.step()
    for name, value in model.state_dict().items():
        if ".lora_" not in name:
            assert torch.equal(value, base[name]), name
    path = checkpoint.save(str(tmp_path), model, opt, step=3)
    assert os.path.exists(os.path.join(path, "adapter_config.json"))
    restored = checkpoint.load_model(path)
    model.eval()
    torch.testing.assert_close(restored.eval()(images, ids).logits, model(images, ids).logits, rtol=0, atol=0)
    lora.merge(model)
    with pytest.raises(ValueError, match="merged"):
        checkpoint.save(str(tmp_path / "merged"), model)


def test_adapter_folder_is_peft_style_and_loads_onto_its_base_only(tmp_path):
    base = vlmkit.build_model(TINY_VLM).eval()
    state = {k: v.clone() for k, v in base.state_dict().items()}
    lora.apply(base, rank=4, alpha=8, dropout=0.1)
    _perturb_adapters(base)
    folder = lora.save(base, str(tmp_path / "adapter"))
    files = sorted(os.listdir(folder))
    assert "adapter_config.json" in files and "adapter_model.safetensors" in files
    with open(os.path.join(folder, "adapter_config.json")) as f:
        config = json.load(f)
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    assert config["lora_dropout"] == pytest.approx(0.1) and config["target_modules"] == lora.layers(base)
    tensors, _ = checkpoint.load_safetensors(os.path.join(folder, "adapter_model.safetensors"))
    assert all(k.startswith("base_model.model.") and k.endswith((".lora_A.weight", ".lora_B.weight"))
               for k in tensors)
    assert len(tensors) == 2 * len(config["target_modules"])
    # Onto a fresh copy of the same base: the same outputs.
    other = vlmkit.build_model(TINY_VLM).eval()
    other.load_state_dict(state)
    assert lora.load(other, folder) == lora.layers(base)
    images, ids = _inputs("encoder_decoder")
    torch.testing.assert_close(other(images, ids).logits, base(images, ids).logits, rtol=0, atol=0)
    # Onto another architecture / size: refused, naming what does not fit.
    wider = dict(TINY_VLM, decoder=dict(TINY_VLM["decoder"], d_model=64))
    with pytest.raises(ValueError, match="shape mismatch|does not fit"):
        lora.load(vlmkit.build_model(wider), folder)
    with pytest.raises(ValueError, match="not an adapter folder"):
        lora.load(vlmkit.build_model(TINY_VLM), checkpoint.save_model(str(tmp_path / "plain"), other))


def _colour_tasks(folder, n, seed, question, answer_of):
    """Flat-colour images with noise; one question per image."""
    from PIL import Image
    import numpy as np
    rgb = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    rows = []
    for i in range(n):
        name = list(rgb)[i % 4]
        pixels = np.clip(np.array(rgb[name])[None, None] + rng.normal(0, 20, (32, 32, 3)), 0, 255).astype(np.uint8)
        path = os.path.join(folder, f"{seed}-{i}.png")
        Image.fromarray(pixels).save(path)
        rows.append({"image": path, "question": question, "answer": answer_of(name), "colour": name})
    manifest = os.path.join(folder, f"{seed}-{question[:4]}.jsonl")
    with open(manifest, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return manifest, rows


def _accuracy(model, rows):
    model.eval()
    images = torch.stack([data.preprocess(data.load_image(r["image"]), 32, "square", normalize="clip")[0]
                          for r in rows])
    prompts = [data.chat_prompt("<image>" + r["question"]) for r in rows]
    outputs = model.generate(images, prompts, 8)
    return sum(o == r["answer"] for o, r in zip(outputs, rows)) / len(rows)


def test_lora_learns_a_new_question_and_keeps_the_old_one(tmp_path):
    """A base that names the colour learns "What is the opposite colour?" through
    rank-4 adapters alone (from never right to always), while its answers to the
    old question stay right: the fine-tune data replays the old question beside
    the new one (without replay the adapters answer every question the new way)."""
    old_q, new_q = "What colour is it?", "What is the opposite colour?"
    opposite = {"red": "green", "green": "red", "blue": "yellow", "yellow": "blue"}
    old_train, old_rows = _colour_tasks(str(tmp_path / "img"), 64, 0, old_q, lambda c: c)
    _, old_test = _colour_tasks(str(tmp_path / "img"), 32, 1, old_q, lambda c: c)
    _, new_rows = _colour_tasks(str(tmp_path / "img"), 64, 2, new_q, opposite.get)
    _, new_test = _colour_tasks(str(tmp_path / "img"), 32, 3, new_q, opposite.get)
    mixed = str(tmp_path / "mixed.jsonl")
    with open(mixed, "w") as f:
        for row in new_rows + old_rows:
            f.write(json.dumps(row) + "\n")
    torch.manual_seed(0)
    model = vlmkit.build_model(TINY_VLM)
    loader = data.Loader(old_train, batch_size=16, num_workers=2, image_size=32, seed=0, drop_last=True)
    vlmkit.Trainer(model, steps=300, lr=3e-3, warmup_steps=10, log_every=0).fit(loader, on_log=lambda r: None)
    old_before, new_before = _accuracy(model, old_test), _accuracy(model, new_test)
    assert old_before >= 0.9, old_before  # the base learned its task
    assert new_before <= 0.1, new_before  # and does not answer the new one
    base = {k: v.clone() for k, v in model.state_dict().items()}
    lora.apply(model, rank=4, target_modules=["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"])
    loader = data.Loader(mixed, batch_size=16, num_workers=2, image_size=32, seed=0, drop_last=True)
    vlmkit.Trainer(model, steps=200, lr=3e-3, warmup_steps=10, log_every=0).fit(loader, on_log=lambda r: None)
    new_after, old_after = _accuracy(model, new_test), _accuracy(model, old_test)
    assert new_after >= 0.9, (new_before, new_after)
    assert old_after >= old_before - 0.05, (old_before, old_after)
    assert all(torch.equal(v, base[k]) for k, v in model.state_dict().items() if k in base)


def test_cli_lora_fine_tune_from_a_checkpoint(tmp_path, capsys):
    manifest, _ = _colour_tasks(str(tmp_path / "img"), 16, 0, "Is it warm?",
                                lambda c: "yes" if c in ("red", "yellow") else "no")
    base = checkpoint.save_model(str(tmp_path / "base"), vlmkit.build_model(TINY_VLM))
    out = str(tmp_path / "ft")
    code = cli.main(["train", "--from", base, "--lora-rank", "2", "--data", manifest, "--steps", "3",
                     "--batch-size", "4", "--scenes", "2", "--eval-scenes", "1", "--output", out])
    assert code == 0
    printed = capsys.readouterr().out
    assert "LoRA: rank 2" in printed and "adapter:" in printed
    assert os.path.exists(os.path.join(out, "adapter", "adapter_config.json"))
    tuned = checkpoint.load_model(out)
    assert lora.layers(tuned)
    # Bad combinations are one-line errors.
    assert cli._LORA_TARGETS == lora.DEFAULT_TARGETS
    assert cli.main(["train", "--lora-rank", "2", "--output", out]) == 2
    assert "--from CHECKPOINT" in capsys.readouterr().err
    assert cli.main(["train", "--from", base, "--lora-rank", "-1", "--output", out]) == 2
    assert cli.main(["train", "--from", base, "--data", str(tmp_path / "none.jsonl"), "--output", out]) == 2
