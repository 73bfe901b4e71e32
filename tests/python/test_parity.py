"""vlmkit against its one plain-PyTorch reference (vlmkit.bench.peers: the suite's
peer and the ONNX export's mirror), with vlmkit's weights copied in: outputs, losses
and every parameter's gradient agree, for every architecture x registered projector
x decoder fusion and both contrastive losses. Configurations the reference does not
mirror are refused by name, never computed differently."""
import copy
import itertools

import pytest
import torch

import vlmkit
from conftest import batch, tiny_config
from test_generative import tiny
from vlmkit import text
from vlmkit.bench import peers


def mirrored(config):
    """vlmkit's model and its reference with the same weights, both in float64 (so a
    wrong computation stands far above rounding; float32 constants such as the 2-D
    sin-cos positions leave differences of a few 1e-9)."""
    torch.manual_seed(0)
    model = vlmkit.build_model(config).to(torch.float64).train()
    assert not peers.unmirrored(model.config), peers.unmirrored(model.config)
    ref = peers.MIRRORS[model.config["architecture"]](model.config).to(torch.float64).train()
    ours, theirs = list(model.named_parameters()), list(ref.named_parameters())
    assert [tuple(p.shape) for _, p in ours] == [tuple(p.shape) for _, p in theirs]
    with torch.no_grad():
        for (_, a), (_, b) in zip(ours, theirs):
            b.copy_(a)
    return model, ref, [n for n, _ in ours], [p for _, p in theirs]


def assert_same_gradients(model, names, ref_params):
    grads = dict(model.named_parameters())
    top = max(p.grad.abs().max().item() for p in ref_params if p.grad is not None)
    for name, p in zip(names, ref_params):
        assert p.grad is not None and grads[name].grad is not None, name
        torch.testing.assert_close(grads[name].grad, p.grad, rtol=1e-5, atol=1e-6 * top, msg=name)


GENERATIVE = list(itertools.product(["encoder_decoder", "encoder_text_decoder"], vlmkit.PROJECTORS,
                                    vlmkit.DECODER_FUSIONS, ["causal", "prefix_lm"]))


@pytest.mark.parametrize("arch,projector,fusion,attention", GENERATIVE)
def test_generative_models_equal_the_reference(arch, projector, fusion, attention):
    model, ref, names, ref_params = mirrored(tiny(arch, projector, fusion, attention=attention))
    g = torch.Generator().manual_seed(1)
    images = torch.rand(2, 3, 32, 32, generator=g, dtype=torch.float64)
    ids = torch.randint(8, 200, (2, 9), generator=g)
    ids[:, 0], ids[:, 2] = text.BOS, model.config.get("image_token_id", 3)
    labels = ids.clone()
    labels[:, :4] = -100
    if arch == "encoder_decoder":
        out = model(images, ids, None, labels)
        logits, loss = ref(images, ids, labels)
        torch.testing.assert_close(out.loss, loss, rtol=1e-6, atol=1e-7)
    else:  # the reference computes this architecture's logits only
        cids = torch.randint(8, 200, (2, 7), generator=g)  # unpadded: the reference's concat needs
        out = model(images, cids, ids)                     # equal fused lengths
        logits, _ = ref(images, cids, ids)
    torch.testing.assert_close(out.logits, logits, rtol=1e-6, atol=1e-7)
    weights = torch.randn(logits.shape, generator=g, dtype=torch.float64)
    (out.logits * weights).sum().backward()
    (logits * weights).sum().backward()
    assert_same_gradients(model, names, ref_params)


@pytest.mark.parametrize("loss", ["clip", "siglip"])
@pytest.mark.parametrize("depth", [1, 2])
def test_two_tower_equals_the_reference(loss, depth):
    cfg = tiny_config("two_tower", loss=loss)
    cfg["image_encoder"]["depth"] = cfg["text_encoder"]["depth"] = depth
    model, ref, names, ref_params = mirrored(cfg)
    images, ids = batch(5)
    images = images.double()
    ids[:2, 4:] = 0  # padded texts
    out = model(images, ids)
    logits, ref_loss = ref(images, ids)
    torch.testing.assert_close(out.logits_per_image, logits, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out.loss, ref_loss, rtol=1e-6, atol=1e-7)
    out.loss.backward()
    ref_loss.backward()
    assert_same_gradients(model, names, ref_params)


def test_two_leg_equals_the_reference():
    model, ref, names, ref_params = mirrored(tiny_config("two_leg"))
    images, ids = batch(4)
    labels = torch.tensor([0, 3, 1, 4])
    out = model(images.double(), ids, None, labels)
    logits, loss = ref(images.double(), ids, labels)
    torch.testing.assert_close(out.logits, logits, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out.loss, loss, rtol=1e-6, atol=1e-7)
    out.loss.backward()
    loss.backward()
    assert_same_gradients(model, names, ref_params)


@pytest.mark.parametrize("arch,change,what", [
    ("two_leg", {"fusion": {"type": "gated"}}, "fusion 'gated'"),
    ("two_tower", {"text_encoder": {"pool": "cls"}}, "pool 'cls'"),
    ("encoder_decoder", {"label_smoothing": 0.1}, "label_smoothing"),
])
def test_the_reference_names_what_it_does_not_mirror(arch, change, what):
    config = copy.deepcopy(tiny(arch) if arch == "encoder_decoder" else tiny_config(arch))
    for key, value in change.items():
        config[key] = {**config[key], **value} if isinstance(value, dict) and key in config else value
    assert any(what in item for item in peers.unmirrored(vlmkit.build_model(config).config))


@pytest.mark.parametrize("seed", [0, 1])
def test_whole_model_float32_gradients_match_float64(seed):
    """Every parameter's float32 gradient of `vlmkit train`'s model equals the float64
    one to a few 1e-6 of that parameter's largest gradient (2.5e-6 measured; the
    floor, 1% of the model's largest gradient, keeps analytically-zero gradients such
    as attention key biases out of the ratio). Catches a wrong float32 kernel such as
    LibTorch 1.13's GELU backward on transposed gradients (garbage or NaN)."""
    from vlmkit.bench import suite
    from vlmkit.train_vlm import SMALL_VLM
    torch.manual_seed(seed)
    model = vlmkit.build_model(SMALL_VLM).train()
    images, ids, labels = suite.batch_for(model.config, 4, 40, seed=seed)
    model(images, ids, None, labels).loss.backward()
    g32 = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.to(torch.float64)
    model(images.double(), ids, None, labels).loss.backward()
    top = max(p.grad.abs().max().item() for p in model.parameters())
    assert top > 0
    for name, p in model.named_parameters():
        scale = max(p.grad.abs().max().item(), 1e-2 * top)
        err = (g32[name].double() - p.grad).abs().max().item() / scale
        assert err < 2e-5, (name, err)
