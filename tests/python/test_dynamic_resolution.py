"""Dynamic resolution end to end: images of different sizes in one batch, padded,
with image_sizes telling the models which patches are real. Each image's tokens,
the decoder's logits and generations must equal what the image gives alone."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

import vlmkit
from vlmkit import _C, data, text

PATCH, MERGE = 8, 2
FIELDS = {row["name"]: row["defaults"] for row in vlmkit.projector_types()}
SIZES = [(32, 64), (64, 32)]  # (height, width), multiples of PATCH * MERGE


def images_of(sizes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(3, h, w, generator=g) for h, w in sizes]


def model(projector, fusion, stem="patch", pos="learned"):
    config = {
        "architecture": "encoder_decoder",
        "image_encoder": {"image_size": 32, "patch_size": PATCH, "d_model": 32, "depth": 2, "num_heads": 4,
                          "stem": stem, "pos_embedding": pos},
        # Projectors that merge tokens do so by MERGE (the default recipe's factor).
        "projector": {"type": projector,
                      **({"factor": MERGE} if "factor" in FIELDS[projector] else {})},
        "fusion": fusion,
        "decoder": {"d_model": 32, "depth": 2, "num_heads": 4, "max_len": 160},
    }
    return vlmkit.EncoderDecoder(config).eval()


@pytest.mark.parametrize("pos", ["learned", "sincos2d"])
@pytest.mark.parametrize("pool", ["cls", "mean", "map"])
@pytest.mark.parametrize("stem", ["patch", "conv"])
def test_vit_padded_batch_equals_each_image_alone(pos, pool, stem):
    vit = _C.ViT(image_size=32, patch_size=PATCH, d_model=32, depth=2, num_heads=4, pos_embedding=pos, pool=pool,
                 stem=stem)
    vit.eval()
    singles = images_of([(16, 32), (32, 24), (32, 32)])
    batch, sizes = data.collate_images(singles)
    assert batch.shape == (3, 3, 32, 32) and sizes.tolist() == [[16, 32], [32, 24], [32, 32]]
    out = vit.forward(batch, sizes)
    rows, cols = out.grid
    assert out.padding_mask.shape == (3, rows * cols)
    for i, image in enumerate(singles):
        alone = vit.forward(image[None])
        r, c = alone.grid
        grid = out.tokens[i].view(rows, cols, -1)
        torch.testing.assert_close(grid[:r, :c].reshape(r * c, -1), alone.tokens[0], atol=2e-6, rtol=0)
        torch.testing.assert_close(out.pooled[i], alone.pooled[0], atol=2e-6, rtol=0)
        mask = out.padding_mask[i].view(rows, cols)
        assert not mask[:r, :c].any() and mask.sum() == rows * cols - r * c
        assert (grid[mask] == 0).all()  # padded tokens are zeroed, not garbage


@pytest.mark.parametrize("projector", vlmkit.PROJECTORS)
@pytest.mark.parametrize("fusion", ["concat", "cross_attention"])
def test_encoder_decoder_logits_and_generation_equal_each_image_alone(projector, fusion):
    m = model(projector, fusion)
    singles = images_of(SIZES)
    images, sizes = data.collate_images(singles)
    prompt = text.encode("<image>What is shown?", add_bos=True)
    ids = torch.tensor([prompt, prompt])
    out = m(images, ids, image_sizes=sizes)
    for i, image in enumerate(singles):
        alone = m(image[None], ids[:1])
        n = alone.logits.shape[1]
        # Concat packs each image's own tokens: the sample's sequence is its first n positions.
        torch.testing.assert_close(out.logits[i, :n], alone.logits[0], atol=2e-5, rtol=0)
        assert out.padding_mask[i, n:].all()
    batched = m.cpp_module.generate_ids(images, [prompt, prompt], max_new_tokens=5, image_sizes=sizes)[0]
    for i, image in enumerate(singles):
        assert batched[i] == m.cpp_module.generate_ids(image[None], [prompt], max_new_tokens=5)[0][0]
    texts = m.generate(images, ["What is shown?"] * 2, max_new_tokens=3, image_sizes=sizes)
    assert len(texts) == 2


def test_two_tower_and_two_leg_take_padded_batches():
    encoders = {"image_encoder": {"image_size": 32, "patch_size": PATCH, "d_model": 32, "depth": 1, "num_heads": 4},
                "text_encoder": {"vocab_size": 300, "max_len": 16, "d_model": 32, "depth": 1, "num_heads": 4}}
    singles = images_of(SIZES)
    images, sizes = data.collate_images(singles)
    ids = torch.randint(4, 300, (2, 6))
    tower = vlmkit.TwoTower({**encoders, "embed_dim": 16}).eval()
    embeds = tower.cpp_module.encode_image(images, sizes)
    for i, image in enumerate(singles):
        torch.testing.assert_close(embeds[i], tower.cpp_module.encode_image(image[None])[0], atol=2e-6, rtol=0)
    assert torch.isfinite(tower(images, ids, image_sizes=sizes).loss)
    leg = vlmkit.TwoLeg({**encoders, "fusion": {"type": "cross_attention", "dim": 32},
                         "head": {"type": "classification", "num_classes": 3}}).eval()
    logits = leg(images, ids, image_sizes=sizes).logits
    for i, image in enumerate(singles):
        torch.testing.assert_close(logits[i], leg(image[None], ids[i:i + 1]).logits[0], atol=2e-5, rtol=0)


def test_patch_padding_mask_for_custom_models():
    images, sizes = data.collate_images(images_of([(16, 32), (32, 16)]))
    mask = data.patch_padding_mask(sizes, 32, 32, patch=8)
    assert mask.shape == (2, 4, 4)
    assert mask[0].tolist() == [[False] * 4] * 2 + [[True] * 4] * 2
    assert mask[1].tolist() == [[False, False, True, True]] * 4
    assert not data.patch_padding_mask(torch.tensor([[32, 32]]), 32, 32, 8).any()
    with pytest.raises(ValueError, match="multiples of 8"):
        data.patch_padding_mask(torch.tensor([[12, 32]]), 32, 32, 8)


def test_image_token_counts_follow_the_image():
    m = model("pixel_shuffle", "concat")
    sizes = [(32, 64), (64, 64), (16, 16)]
    images, image_sizes = data.collate_images(images_of(sizes))
    tokens, mask = m.cpp_module.encode_images(images, image_sizes)
    valid = (~mask).sum(1).tolist()
    assert valid == [(h // PATCH) * (w // PATCH) // MERGE**2 for h, w in sizes] == [8, 16, 1]
    # The fused sequence of each prompt grows with its image's tokens.
    prompt = text.encode("<image>Hi", add_bos=True)
    out = m(images, torch.tensor([prompt] * 3), image_sizes=image_sizes)
    lengths = (~out.padding_mask).sum(1).tolist()
    assert lengths == [len(prompt) - 1 + v for v in valid]


@pytest.mark.parametrize("stem", ["patch", "conv"])
def test_loss_and_gradients_with_padded_images(stem):
    m = model("mlp", "concat", stem=stem).train()
    images, sizes = data.collate_images(images_of(SIZES))
    images.requires_grad_(True)
    ids = torch.tensor([text.encode("<image>Q? red", add_bos=True)] * 2)
    labels = ids.clone()
    labels[:, :4] = -100
    out = m(images, ids, None, labels, image_sizes=sizes)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    grads = {n: p.grad for n, p in m.named_parameters() if p.requires_grad}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    # Catches all-zero gradients (a detached or masked-out path) and padding that leaks:
    # the image encoder and projector learn from the loss, every image's real pixels
    # get gradient and its padded pixels get none.
    for name in ("image_encoder", "projector"):
        assert any(g.abs().sum() > 0 for n, g in grads.items() if n.startswith(name)), name
    for i, (h, w) in enumerate(sizes.tolist()):
        g = images.grad[i]
        assert g[:, :h, :w].abs().sum() > 0
        padded = g.clone()
        padded[:, :h, :w] = 0
        assert padded.abs().sum() == 0, f"image {i}: padding receives gradient"


def test_bad_image_sizes_raise_clear_errors():
    m = model("pixel_shuffle", "concat")
    images, sizes = data.collate_images(images_of(SIZES))
    ids = torch.tensor([text.encode("<image>Hi", add_bos=True)] * 2)
    with pytest.raises(ValueError, match=r"expected image_sizes of shape \[2, 2\]"):
        m(images, ids, image_sizes=sizes[:1])
    with pytest.raises(ValueError, match="does not fit the padded 64x64 batch"):
        m(images, ids, image_sizes=torch.tensor([[80, 16], [16, 16]]))
    with pytest.raises(ValueError, match="must be multiples of 8"):
        m(images, ids, image_sizes=torch.tensor([[20, 16], [16, 16]]))
    with pytest.raises(TypeError, match="int64"):
        m(images, ids, image_sizes=sizes.float())
    # Multiples of the patch but not of patch * merge: pixel shuffle cannot merge the grid.
    with pytest.raises(ValueError, match="divisible by 2"):
        m(images, ids, image_sizes=torch.tensor([[24, 16], [16, 16]]))
    conv = _C.ConvStage(image_size=32, channels=[16, 32], d_model=32)
    with pytest.raises(ValueError, match="variable-size images"):
        conv.forward(images, sizes)
    conv.forward(images, torch.tensor([[64, 64], [64, 64]]))  # nothing padded: fine
    with pytest.raises(ValueError, match="expected \\[C, H, W\\] images with C = 3"):
        data.collate_images([torch.zeros(3, 4, 4), torch.zeros(1, 4, 4)])
    with pytest.raises(ValueError, match="at least one image"):
        data.collate_images([])


def test_preprocess_dynamic_keeps_aspect_and_maps_boxes():
    image = torch.zeros(100, 300, 3, dtype=torch.uint8)
    pixels, boxes = data.preprocess(image, size=64, mode="dynamic", patch_size=8, merge_size=2,
                                    boxes=[[30, 10, 150, 50]])
    h, w = pixels.shape[1:]
    assert h % 16 == 0 and w % 16 == 0 and h * w <= 64 * 64 and w > 2 * h
    assert boxes[0] == pytest.approx([30 * w / 300, 10 * h / 100, 150 * w / 300, 50 * h / 100])


@pytest.fixture
def varied_manifest(tmp_path):
    rng = np.random.default_rng(0)
    shapes = [(40, 120), (120, 40), (64, 64), (30, 90), (90, 60), (50, 50)]
    with open(tmp_path / "m.jsonl", "w") as f:
        for i, (h, w) in enumerate(shapes):
            Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
            f.write(json.dumps({"image": f"{i}.png", "question": "Colour?", "answer": "red"}) + "\n")
    return tmp_path / "m.jsonl", shapes


def test_loader_dynamic_mode_batches_variable_sizes(varied_manifest):
    path, shapes = varied_manifest
    loader = data.Loader(path, batch_size=3, num_workers=2, shuffle=False, image_size=64, resize="dynamic",
                         patch_size=PATCH, merge_size=MERGE)
    batches = list(loader)
    assert len(batches) == 2
    for batch in batches:
        sizes = batch["image_sizes"]
        images = batch["images"]
        assert images.shape[2:] == (sizes[:, 0].max(), sizes[:, 1].max())
        for (h, w), index in zip(sizes.tolist(), batch["indices"].tolist()):
            oh, ow = shapes[index]
            assert (h, w) == data.dynamic_resolution(oh, ow, PATCH, MERGE, 16 * 16, 64 * 64)
        for i, (h, w) in enumerate(sizes.tolist()):
            assert (images[i, :, h:, :] == 0).all() and (images[i, :, :, w:] == 0).all()
            assert images[i, :, :h, :w].abs().sum() > 0
    # Wide, tall and square images give different token counts.
    counts = {(h // PATCH) * (w // PATCH) // MERGE**2 for b in batches for h, w in b["image_sizes"].tolist()}
    assert len(counts) >= 3
    # The same record decodes to the same pixels as the function API.
    first = batches[0]
    expected, _ = data.preprocess(str(path.parent / "0.png"), size=64, mode="dynamic", patch_size=PATCH,
                                  merge_size=MERGE)
    h, w = first["image_sizes"][0].tolist()
    torch.testing.assert_close(first["images"][0, :, :h, :w], expected)


def test_trainer_trains_on_dynamic_batches(varied_manifest, tmp_path):
    path, _ = varied_manifest
    loader = data.Loader(path, batch_size=3, num_workers=1, shuffle=True, image_size=64, resize="dynamic",
                         patch_size=PATCH, merge_size=MERGE)
    torch.manual_seed(0)
    m = model("pixel_shuffle", "concat").train()
    # The first logged loss is the model's loss on the first batch with its
    # image_sizes: catches a Trainer that drops image_sizes (the padded images then
    # give another loss) or trains on something else.
    first = next(iter(loader))
    with torch.no_grad():
        expected = m(first["images"], first["input_ids"], first["padding_mask"], first["labels"],
                     image_sizes=first["image_sizes"]).loss.item()
        unsized = m(first["images"], first["input_ids"], first["padding_mask"], first["labels"]).loss.item()
    assert abs(expected - unsized) > 1e-4
    trainer = vlmkit.Trainer(m, steps=8, lr=3e-3, warmup_steps=0, log_every=1, output_dir=str(tmp_path / "run"))
    records = []
    trainer.fit(loader, on_log=records.append)
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 8 and all(np.isfinite(losses))
    assert losses[0] == pytest.approx(expected, rel=1e-5)
    # The constant answer is learnt: 5.6 -> 4.5 measured; a step that did nothing useful stays near 5.6.
    assert losses[-1] < 0.85 * losses[0], losses


def test_fixed_size_loader_reports_full_image_sizes(varied_manifest):
    path, _ = varied_manifest
    batch = next(iter(data.Loader(path, batch_size=2, image_size=32, shuffle=False)))
    assert batch["image_sizes"].tolist() == [[32, 32], [32, 32]]
    with pytest.raises(ValueError, match="crop_scale"):
        data.Loader(path, resize="dynamic", crop_scale=0.5)
    with pytest.raises(ValueError, match="'dynamic' or 'tiles'"):
        data.Loader(path, resize="mosaic")


def test_loader_tiles_mode_gives_a_global_view_and_tiles_with_placeholders(varied_manifest):
    path, shapes = varied_manifest
    loader = data.Loader(path, batch_size=3, shuffle=False, image_size=32, resize="tiles", max_tiles=4)
    batch = next(iter(loader))
    counts = batch["images_per_sample"].tolist()
    # 40x120 -> 1x3 grid (+ global), 120x40 -> 3x1, 64x64 -> 1x1 (+ global)
    expected = []
    for index in batch["indices"].tolist():
        h, w = shapes[index]
        tiles, grid = data.tile_image(torch.zeros(h, w, 3, dtype=torch.uint8), 32, max_tiles=4)
        expected.append(len(tiles))
    assert counts == expected and counts[0] > 2
    assert batch["images"].shape == (sum(counts), 3, 32, 32)
    placeholders = (batch["input_ids"] == text.TOKENIZER.image_id).sum(1).tolist()
    assert placeholders == counts
    # The first view of a sample is its global view: the whole image resized.
    first = data.preprocess(str(path.parent / "0.png"), size=32)[0]
    torch.testing.assert_close(batch["images"][0], first)
    m = model("pixel_shuffle", "concat").train()
    out = m(batch["images"], batch["input_ids"], batch["padding_mask"], batch["labels"],
            image_sizes=batch["image_sizes"])
    assert torch.isfinite(out.loss)
    no_global = next(iter(data.Loader(path, batch_size=3, shuffle=False, image_size=32, resize="tiles",
                                      global_view=False)))
    assert no_global["images_per_sample"].tolist() == [c - 1 for c in counts]
    with pytest.raises(ValueError, match="max_tiles"):
        data.Loader(path, resize="tiles", max_tiles=0)
