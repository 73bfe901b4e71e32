"""Sequence packing: several examples per row (segment_ids) give the loss and the
gradients of the same examples one per row, for every architecture x projector x
fusion, both attention policies, the three loss reductions and both position kinds;
the Loader packs to a token budget and groups by length."""
import itertools
import json

import pytest
import torch

import vlmkit
from vlmkit import data, text

from test_generative import ARCHS, FUSIONS, PROJECTORS, tiny

PROMPTS = ["<image>What colour?", "<image>Describe the picture", "<image>Count", "<image>Where is it?"]
ANSWERS = ["red", "a blue circle on grey", "3", "left"]
CONTEXTS = ["a red square", "blue", "three shapes", "left of centre"]
# Example numbers per packed row: rows of 1, 2 and 1 examples, out of order.
ROWS = [[1], [0, 3], [2]]


def pack(ids, labels, mask, rows):
    """Unpacked [N, T] examples -> packed rows [R, T'] and segment ids (-1 at padding)."""
    lengths = (~mask).sum(1).tolist()
    width = max(sum(lengths[i] for i in row) for row in rows)
    out_ids = torch.full((len(rows), width), text.PAD, dtype=torch.long)
    out_labels = torch.full((len(rows), width), text.IGNORE_INDEX, dtype=torch.long)
    segments = torch.full((len(rows), width), -1, dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for s, i in enumerate(row):
            n = lengths[i]
            out_ids[r, at:at + n] = ids[i, :n]
            out_labels[r, at:at + n] = labels[i, :n]
            segments[r, at:at + n] = s
            at += n
    return out_ids, out_labels, out_ids.eq(text.PAD), segments


def losses_and_grads(model, arch, packed):
    torch.manual_seed(0)
    images = torch.rand(4, 3, 32, 32, dtype=torch.float64)
    ids, labels, mask = text.training_batch(PROMPTS, ANSWERS)
    cids, cmask = text.encode_batch(CONTEXTS, 16)
    order = [i for row in ROWS for i in row] if packed else list(range(4))
    if packed:
        ids, labels, mask, segments = pack(ids, labels, mask, ROWS)
    model.zero_grad()
    kwargs = {"segment_ids": segments} if packed else {}
    if arch == "encoder_decoder":
        out = model(images[order], ids, mask, labels, **kwargs)
    else:
        out = model(images[order], cids[order], ids, cmask[order], mask, labels, **kwargs)
    out.loss.backward()
    return out.loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


SETTINGS = [("prefix_lm", "sample", "rotary"), ("causal", "token", "learned"), ("causal", "sqrt", "rotary")]


@pytest.mark.parametrize("arch,projector,fusion,setting",
                         list(itertools.product(ARCHS, PROJECTORS, FUSIONS, SETTINGS)))
def test_packed_rows_give_the_loss_and_gradients_of_unpacked_ones(arch, projector, fusion, setting):
    attention, reduction, positions = setting
    config = tiny(arch, projector, fusion, attention=attention, loss_reduction=reduction)
    config["decoder"]["pos_embedding"] = positions
    config["decoder"]["max_len"] = 320  # two examples of up to 80 image and context tokens in a row
    torch.manual_seed(0)
    model = vlmkit.build_model(config).double()
    loss, grads = losses_and_grads(model, arch, packed=False)
    packed_loss, packed_grads = losses_and_grads(model, arch, packed=True)
    assert abs(packed_loss - loss) < 1e-5
    for name, grad in grads.items():
        assert torch.allclose(packed_grads[name], grad, atol=1e-5, rtol=1e-5), name
    assert any(g.abs().sum() > 0 for g in grads.values())


def test_packing_without_masks_would_differ():
    """The equality above is not vacuous: the same packed rows read as one example
    each (no segment ids) give a loss well outside its 1e-5 tolerance."""
    model = vlmkit.build_model(tiny("encoder_decoder", "mlp", "concat")).double()
    torch.manual_seed(0)
    images = torch.rand(4, 3, 32, 32, dtype=torch.float64)
    ids, labels, mask = text.training_batch(PROMPTS, ANSWERS)
    order = [i for row in ROWS for i in row]
    ids, labels, mask, segments = pack(ids, labels, mask, ROWS)
    packed = model(images[order], ids, mask, labels, segment_ids=segments).loss.item()
    plain = model(images[order], ids, mask, labels).loss.item()
    assert abs(packed - plain) > 1e-4


@pytest.mark.parametrize("fusion", FUSIONS)
def test_packed_rows_with_qk_norm_train_in_bf16(fusion):
    """QK-norm in every attention, packed rows with padding, bfloat16 autocast: the
    norms compute in float32, and q and k go back to bf16 before the scores. Once a
    float32 q made the mask float32 while the scores were bf16; the padding
    positions of a packed row, which see no image, then had every key at -inf, and
    the loss was NaN."""
    config = tiny("encoder_decoder", "mlp", fusion)
    config["decoder"]["qk_norm"] = True
    config["decoder"]["max_len"] = 320
    torch.manual_seed(0)
    model = vlmkit.build_model(config)
    images = torch.rand(4, 3, 32, 32)
    ids, labels, mask = text.training_batch(PROMPTS, ANSWERS)
    order = [i for row in ROWS for i in row]
    ids, labels, mask, segments = pack(ids, labels, mask, ROWS)
    assert (segments == -1).any()  # rows end in padding
    full = model(images[order], ids, mask, labels, segment_ids=segments).loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(images[order], ids, mask, labels, segment_ids=segments).loss
    low.backward()
    assert torch.isfinite(low) and abs(low.item() - full.item()) < 0.05
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_bad_segment_ids_are_refused():
    model = vlmkit.build_model(tiny("encoder_decoder", "mlp", "cross_attention"))
    images = torch.rand(4, 3, 32, 32)
    ids, labels, mask = text.training_batch(PROMPTS, ANSWERS)
    ids, labels, mask, segments = pack(ids, labels, mask, ROWS)
    with pytest.raises(ValueError, match="number the examples of each row 0, 1, ... in order"):
        model(images, ids, mask, labels, segment_ids=segments + 1)
    with pytest.raises(ValueError, match="shape"):
        model(images, ids, mask, labels, segment_ids=segments[:, :-1])
    with pytest.raises(TypeError, match="int64"):
        model(images, ids, mask, labels, segment_ids=segments.float())
    with pytest.raises(ValueError, match="packed rows hold 4 examples, one image each"):
        model(images[:3], ids, mask, labels, segment_ids=segments)
    concat = vlmkit.build_model(tiny("encoder_text_decoder", "mlp", "concat"))
    cids, cmask = text.encode_batch(CONTEXTS, 16)
    two = segments.clone()
    two[1] = (~mask[1]).long() - 1  # row 1 read as one example holding two <image>s
    with pytest.raises(ValueError, match=r"exactly one <image> placeholder \(id 3\); row 1 example 0 has 2"):
        concat(images, cids, ids, cmask, mask, labels, segment_ids=two)


def write_tasks(tmp_path, count=24):
    from vlmkit.train_vlm import write_task_manifest
    return write_task_manifest(str(tmp_path / "scenes"), count // 8 + 1, 0, 32)


def test_loader_packs_each_batch_to_the_budget(tmp_path):
    manifest = write_tasks(tmp_path)
    plain = data.Loader(manifest, batch_size=16, num_workers=2, image_size=32, shuffle=True, seed=3)
    packed = data.Loader(manifest, batch_size=16, num_workers=2, image_size=32, shuffle=True, seed=3,
                         pack_to=200, pack_image_tokens=16)
    assert len(plain) == len(packed)
    for a, b in zip(plain, packed):
        # The same examples (the same order of records per epoch), fewer rows.
        assert sorted(a["indices"].tolist()) == sorted(b["indices"].tolist())
        assert b["input_ids"].shape[0] <= a["input_ids"].shape[0]
        seg, pad = b["segment_ids"], b["padding_mask"]
        assert seg[pad].eq(-1).all() and seg[~pad].ge(0).all()
        assert b["images"].shape[0] == len(b["indices"]) == int(b["images_per_sample"].sum())
        example = {int(r): i for i, r in enumerate(a["indices"].tolist())}
        k = 0
        for r in range(seg.shape[0]):
            n_seg = int(seg[r].max()) + 1
            used = 0
            for s in range(n_seg):
                tokens = b["input_ids"][r][seg[r] == s]
                labels = b["labels"][r][seg[r] == s]
                i = example[int(b["indices"][k])]
                n = int((~a["padding_mask"][i]).sum())
                assert tokens.tolist() == a["input_ids"][i, :n].tolist()
                assert labels.tolist() == a["labels"][i, :n].tolist()
                assert torch.equal(b["images"][k], a["images"][i])
                used += n + 15 * int(tokens.eq(text.IMAGE).sum())
                k += 1
            assert n_seg == 1 or used <= 200
            assert int(b["images_per_sample"][r]) == n_seg


def test_trainer_takes_packed_batches_and_counts_examples(tmp_path):
    manifest = write_tasks(tmp_path)
    config = tiny("encoder_decoder", "pixel_shuffle", "concat", attention="prefix_lm", loss_reduction="sample")
    config["image_encoder"]["patch_size"] = 4  # 64 patches, 16 tokens after pixel shuffle
    config["decoder"]["max_len"] = 256
    results = []
    for pack_to in (0, 256):
        torch.manual_seed(0)
        model = vlmkit.build_model(config)
        loader = data.Loader(manifest, batch_size=8, num_workers=1, image_size=32, seed=1, drop_last=True,
                             pack_to=pack_to, pack_image_tokens=16)
        trainer = vlmkit.Trainer(model, steps=3, lr=1e-3, warmup_steps=1, log_every=1)
        summary = trainer.fit(loader)
        results.append((summary, [p.detach().clone() for p in model.parameters()]))
    (plain, plain_params), (packed, packed_params) = results
    assert packed["samples"] == plain["samples"] == 24
    assert abs(packed["loss"] - plain["loss"]) < 1e-4
    for a, b in zip(plain_params, packed_params):
        assert torch.allclose(a, b, atol=1e-4), "packed training diverged from unpacked"


def test_group_by_length_sorts_windows_and_keeps_every_record(tmp_path):
    manifest = write_tasks(tmp_path, 80)
    loader = data.Loader(manifest, batch_size=4, num_workers=1, image_size=32, seed=2, group_by_length=True)
    plain = data.Loader(manifest, batch_size=4, num_workers=1, image_size=32, seed=2)
    assert sorted(loader.epoch_order(0)) == sorted(plain.epoch_order(0))
    assert loader.epoch_order(0) != loader.epoch_order(1)
    waste, plain_waste = [], []
    for source, out in ((loader, waste), (plain, plain_waste)):
        for batch in source:
            out.append(batch["padding_mask"].float().mean().item())
    assert sum(waste) / len(waste) < 0.5 * sum(plain_waste) / len(plain_waste)


def test_loader_refuses_bad_packing_options(tmp_path):
    manifest = write_tasks(tmp_path)
    with pytest.raises(ValueError, match="pack_to >= 0"):
        data.Loader(manifest, pack_to=-1)
    with pytest.raises(ValueError, match="pack_image_tokens >= 1"):
        data.Loader(manifest, pack_to=64, pack_image_tokens=0)
