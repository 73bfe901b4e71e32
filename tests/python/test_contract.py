"""The torch.nn.Module contract for every bound model and block."""
import io

import pytest
import torch

import vlmkit
from conftest import batch, tiny_config


def make(kind):
    if kind == "two_tower":
        return vlmkit.TwoTower(tiny_config("two_tower")), "two_tower"
    if kind == "two_leg":
        return vlmkit.TwoLeg(tiny_config("two_leg")), "two_leg"
    raise AssertionError(kind)


def run(model, kind, dtype=torch.float32):
    images, ids = batch()
    if kind == "two_tower":
        return model(images.to(dtype), ids).loss
    return model(images.to(dtype), ids, labels=torch.tensor([0, 1, 2, 3])).loss


@pytest.mark.parametrize("kind", ["two_tower", "two_leg"])
def test_is_module_and_optimizer_step_changes_weights(kind):
    model, kind = make(kind)
    assert isinstance(model, torch.nn.Module)
    params = list(model.parameters())
    assert all(p.requires_grad for p in params)
    before = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    loss = run(model, kind)
    opt.zero_grad()
    loss.backward()
    assert all(p.grad is not None for p in params)
    opt.step()
    assert any(not torch.equal(a, p) for a, p in zip(before, params))


@pytest.mark.parametrize("kind", ["two_tower", "two_leg"])
def test_to_float64_train_eval_and_device_strings(kind):
    model, kind = make(kind)
    assert model.to(torch.float64) is model
    assert all(p.dtype == torch.float64 for p in model.parameters())
    assert run(model, kind, torch.float64).dtype == torch.float64
    model.to("cpu")
    model.double().float()
    assert model.eval() is model and not model.training
    assert model.train() is model and model.training
    model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("kind", ["two_tower", "two_leg"])
def test_state_dict_round_trip_through_torch_save(kind):
    model, kind = make(kind)
    state = model.state_dict()
    assert len(state) == len(list(model.parameters())) + len(list(model.buffers()))
    assert all(not t.requires_grad for t in state.values())
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    torch.manual_seed(123)  # a differently initialised twin
    twin = vlmkit.build_model(model.config)
    images, ids = batch()
    model.eval(), twin.eval()
    with torch.no_grad():
        if kind == "two_tower":
            assert not torch.equal(model.encode_image(images), twin.encode_image(images))
    result = twin.load_state_dict(torch.load(buffer))
    assert result.missing_keys == [] and result.unexpected_keys == []
    with torch.no_grad():
        a, b = model(images, ids), twin(images, ids)
        key = "logits_per_image" if kind == "two_tower" else "logits"
        assert torch.equal(getattr(a, key), getattr(b, key))


def test_load_state_dict_reports_problems():
    model = vlmkit.TwoTower(tiny_config("two_tower"))
    state = model.state_dict()
    bad = dict(state)
    bad.pop("logit_scale")
    with pytest.raises(RuntimeError, match="Missing key"):
        model.load_state_dict(bad)
    assert model.load_state_dict(bad, strict=False).missing_keys == ["logit_scale"]
    wrong = dict(state)
    wrong["image_projection.weight"] = torch.zeros(3, 3)
    with pytest.raises(RuntimeError, match="size mismatch for 'image_projection.weight'"):
        model.load_state_dict(wrong)
    with pytest.raises(TypeError):
        model.load_state_dict([1, 2])


def test_hooks_and_sequential():
    block = vlmkit.TransformerBlock(16, 2)
    seen = []
    handle = block.register_forward_hook(lambda m, inp, out: seen.append(out.shape))
    seq = torch.nn.Sequential(torch.nn.Linear(16, 16), block, torch.nn.LayerNorm(16))
    out = seq(torch.randn(2, 5, 16))
    assert out.shape == (2, 5, 16) and seen == [torch.Size([2, 5, 16])]
    handle.remove()
    out.sum().backward()
    assert all(p.grad is not None for p in block.parameters())


def test_config_rebuilds_the_same_architecture():
    for arch in vlmkit.ARCHITECTURES:
        model = vlmkit.build_model(tiny_config(arch))
        config = model.config
        assert config["architecture"] == arch
        again = vlmkit.build_model(config)
        assert again.config == config
        assert [tuple(p.shape) for p in again.parameters()] == [tuple(p.shape) for p in model.parameters()]
    defaults = vlmkit.default_config("two_leg")
    assert defaults["fusion"]["type"] == "concat_mlp" and defaults["head"]["num_classes"] == 16


def test_blocks_are_modules_with_options_and_repr():
    vit = vlmkit.ViT(image_size=32, patch_size=8, d_model=32, depth=1, num_heads=4, pool="mean")
    assert isinstance(vit, torch.nn.Module)
    assert vit.options["pool"] == "mean" and vit.config["type"] == "vit"
    out = vit(torch.rand(2, 3, 32, 32))
    assert out.tokens.shape == (2, 16, 32) and out.pooled.shape == (2, 32) and out.grid == (4, 4)
    assert "vlmkit::ViT(" in repr(vit) and "pool=mean" in repr(vit)
    text = vlmkit.TextEncoder(vocab_size=64, max_len=16, d_model=32, depth=1, num_heads=4)
    t = text(torch.randint(1, 64, (2, 5)))
    assert len(vlmkit.fusion_types()) == len(vlmkit.FUSIONS) >= 4
    for row in vlmkit.fusion_types():  # every registered Two-Leg fusion, from the C++ registry
        fusion_cls = getattr(vlmkit, row["python_class"])
        assert issubclass(fusion_cls, torch.nn.Module) and row["python_class"] in vlmkit.__all__
        fusion = fusion_cls(32, 32, dim=16)
        assert fusion(out, t).shape == (2, 16) and fusion.output_dim() == 16
        assert fusion.config == {**row["defaults"], "dim": 16, "type": row["name"]}
        child = vlmkit.build_model({"architecture": "two_leg", "fusion": {"type": row["name"]}}).fusion
        assert type(child) is fusion_cls and isinstance(child.cpp_module, vlmkit.Fusion)
        with pytest.raises(ValueError, match=f"unknown config key '{row['python_class']}.bogus'"):
            fusion_cls(32, 32, bogus=1)
        with pytest.raises(TypeError, match="positional arguments"):
            fusion_cls(32)
    with pytest.raises(ValueError, match="unknown fusion type 'sum'; expected one of " +
                       ", ".join(f"'{name}'" for name in vlmkit.FUSIONS)):
        vlmkit.build_model({"architecture": "two_leg", "fusion": {"type": "sum"}})
    attn = vlmkit.MultiheadAttention(32, 4, context_dim=16)
    assert attn(torch.randn(2, 3, 32), context=torch.randn(2, 4, 16)).shape == (2, 3, 32)
    head = vlmkit.ClassificationHead(32, 7, hidden_dim=16)
    assert head(torch.randn(3, 32)).shape == (3, 7)
    logits = torch.tensor([[2.0, 0.0], [1.0, 3.0]])
    assert torch.allclose(vlmkit.ClipLoss()(logits), vlmkit.clip_loss(logits))


def test_heads_losses_and_architectures_come_from_the_cpp_tables():
    """The Two-Leg head, the Two-Tower loss and the architecture are C++ tables too:
    Python reads their names, builds one class per head row, and the configs look
    the names up (an unknown one refused listing the registered ones)."""
    assert set(vlmkit.ARCHITECTURES) == {row["name"] for row in vlmkit._C.architecture_types()} == \
        {"two_tower", "two_leg", "encoder_text_decoder", "encoder_decoder"}
    for name in vlmkit.ARCHITECTURES:
        assert vlmkit.build_model({"architecture": name}).config["architecture"] == name
    assert vlmkit.CONTRASTIVE_LOSSES == ("clip", "siglip")
    learned = {row["name"]: row["learned_bias"] for row in vlmkit.contrastive_loss_types()}
    for loss, bias in learned.items():
        model = vlmkit.build_model({"architecture": "two_tower", "loss": loss})
        assert ("logit_bias" in dict(model.named_parameters())) == bias
    with pytest.raises(ValueError, match="config key 'loss': unknown contrastive loss 'triplet'; expected one of "
                                         "'clip', 'siglip'"):
        vlmkit.build_model({"architecture": "two_tower", "loss": "triplet"})
    assert vlmkit.HEADS == ("classification", "matching")
    fused = torch.randn(3, 32)
    for row in vlmkit.head_types():
        cls = getattr(vlmkit, row["python_class"])
        assert row["python_class"] in vlmkit.__all__ and row["fields"][0] == "num_classes"
        head = cls(32, hidden_dim=8)
        child = vlmkit.build_model({"architecture": "two_leg", "head": {"type": row["name"]}}).head
        assert type(child) is cls and isinstance(child.cpp_module, vlmkit.Head)
        assert head.config == {**row["defaults"], "hidden_dim": 8, "type": row["name"]}
    head = vlmkit.ClassificationHead(32, 7)  # the fields also positionally, in declaration order
    logits = head(fused)
    labels = torch.tensor([0, 6, 3])
    assert logits.shape == (3, 7) and torch.allclose(head.loss(logits, labels), vlmkit.classification_loss(logits, labels))
    matching = vlmkit.MatchingHead(32)
    scores = matching(fused)
    assert scores.shape == (3,)
    assert torch.allclose(matching.loss(scores, torch.tensor([1.0, 0.0, 1.0])),
                          vlmkit.matching_loss(scores, torch.tensor([1.0, 0.0, 1.0])))
    with pytest.raises(ValueError, match="a matching head has exactly 1 output"):
        vlmkit.MatchingHead(32, 3)
    with pytest.raises(TypeError, match="multiple values for argument 'num_classes'"):
        vlmkit.ClassificationHead(32, 7, num_classes=5)
    with pytest.raises(TypeError, match="takes 1 to 4 positional arguments"):
        vlmkit.ClassificationHead(32, 7, 0, 0.0, 1)
    with pytest.raises(ValueError, match="config key 'head.type': unknown head 'ranking'; expected one of "
                                         "'classification', 'matching'"):
        vlmkit.build_model({"architecture": "two_leg", "head": {"type": "ranking"}})


def test_gradcheck_float64_attention():
    attn = vlmkit.MultiheadAttention(8, 2).double()
    x = torch.randn(1, 3, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: attn(t, causal=True), (x,))


def test_children_are_nn_modules():
    """model.image_encoder, model.decoder.blocks[0], ... are torch.nn.Modules over the same
    C++ tensors: named_modules, apply, per-module requires_grad_, hooks when called."""
    model = vlmkit.build_model({"architecture": "encoder_decoder", "decoder": {"depth": 2}})
    assert isinstance(model.image_encoder, vlmkit.ViT) and isinstance(model.decoder.blocks[1], torch.nn.Module)
    assert len(model.decoder.blocks) == 2 and model.image_encoder is model.image_encoder
    names = dict(model.named_modules())
    assert "decoder.blocks.0" in names and names["decoder"] is model.decoder
    # One tensor per name: the recursive view equals C++'s own list, in its order.
    assert [n for n, _ in model.named_parameters()] == list(model.cpp_module.named_parameters(True))
    assert model.decoder.blocks[0].cpp_module is not None
    model.image_encoder.requires_grad_(False)
    assert all(not p.requires_grad for n, p in model.named_parameters() if n.startswith("image_encoder."))
    assert any(p.requires_grad for n, p in model.named_parameters() if n.startswith("decoder."))
    seen = []
    model.apply(lambda m: seen.append(type(m).__name__))
    assert seen.count("TransformerBlock") >= 2 and seen[-1] == "EncoderDecoder"
    model.eval()
    assert not model.decoder.blocks[0].training and not model.training
    calls = []
    handle = model.image_encoder.register_forward_hook(lambda m, args, out: calls.append(out.tokens.shape))
    model.image_encoder(torch.rand(1, 3, 64, 64))
    handle.remove()
    assert calls == [(1, 64, 128)]
    with pytest.raises(TypeError, match="indices must be integers"):
        model.decoder.blocks["0"]


def test_encoder_slots_come_from_the_registry():
    """Image and text encoders are registry slots: each row's class is public, its defaults
    are the fields its config reads, and unknown types list the registered ones."""
    for rows, arch in ((vlmkit.image_encoder_types(), "image_encoder"), (vlmkit.text_encoder_types(), "text_encoder")):
        assert rows and [r["name"] for r in rows] == sorted(r["name"] for r in rows)
        for row in rows:
            cls = getattr(vlmkit, row["python_class"])
            assert issubclass(cls, torch.nn.Module) and row["python_class"] in vlmkit.__all__
            config = vlmkit.default_config("two_tower")
            config[arch] = {"type": row["name"]}
            if row["name"] == "conv":  # a conv stage has no CLS token: the tower pools by mean
                config[arch]["image_size"] = 64
            model = vlmkit.build_model(config)
            child = getattr(model, arch)
            assert type(child) is cls and child.config == {"type": row["name"], **row["defaults"]}
    assert set(vlmkit.IMAGE_ENCODERS) >= {"vit", "conv"} and "transformer" in vlmkit.TEXT_ENCODERS
    with pytest.raises(ValueError, match="unknown image encoder type 'resnet'; expected one of 'conv', 'vit'"):
        vlmkit.build_model({"architecture": "two_tower", "image_encoder": {"type": "resnet"}})
    with pytest.raises(TypeError, match="config key 'text_encoder.type': expected a string"):
        vlmkit.build_model({"architecture": "two_tower", "text_encoder": {"type": 3}})
