"""Architectures 3 and 4 with every projector and fusion: forward, backward,
learning on a fixed batch, and generation with and without the KV cache."""
import copy
import itertools
import json

import pytest
import torch

import vlmkit
from vlmkit import text

PROJECTORS = list(vlmkit.PROJECTORS)
FUSIONS = list(vlmkit.DECODER_FUSIONS)
ARCHS = ["encoder_decoder", "encoder_text_decoder"]

PROMPTS = ["<image>What colour?", "<image>Describe the picture"]
ANSWERS = ["red", "a blue circle"]
CONTEXTS = ["a red square", "blue"]


def tiny(arch, projector="mlp", fusion="concat", **extra):
    config = {
        "architecture": arch,
        "projector": {"type": projector},
        "fusion": fusion,
        "decoder": {"d_model": 32, "depth": 2, "num_heads": 4, "max_len": 160},
    }
    if arch == "encoder_decoder":
        config["image_encoder"] = {"image_size": 32, "patch_size": 8, "d_model": 32, "depth": 1, "num_heads": 4}
    else:
        config["image_encoder"] = {"type": "conv", "image_size": 32, "channels": [16, 32], "d_model": 32}
        config["text_encoder"] = {"d_model": 32, "depth": 1, "num_heads": 4, "max_len": 16}
    config.update(extra)
    return config


def run(model, arch, images, ids, labels, mask):
    if arch == "encoder_decoder":
        return model(images, ids, mask, labels)
    cids, cmask = text.encode_batch(CONTEXTS[: len(ids)], 16)
    return model(images, cids, ids, cmask, mask, labels)


def generate(model, arch, images, prompts, **kwargs):
    if arch == "encoder_decoder":
        return model.generate(images, prompts, return_ids=True, **kwargs)[1]
    return model.generate(images, CONTEXTS[: len(prompts)], prompts, return_ids=True, **kwargs)[1]


@pytest.mark.parametrize("arch,projector,fusion", list(itertools.product(ARCHS, PROJECTORS, FUSIONS)))
def test_every_combination_trains_and_generates_the_same_with_and_without_cache(arch, projector, fusion):
    torch.manual_seed(0)
    model = vlmkit.build_model(tiny(arch, projector, fusion))
    assert isinstance(model, torch.nn.Module) and model.config["projector"]["type"] == projector
    images = torch.rand(2, 3, 32, 32)
    ids, labels, mask = text.training_batch(PROMPTS, ANSWERS)
    out = run(model, arch, images, ids, labels, mask)
    assert out.logits.shape[0] == 2 and out.logits.shape[2] == text.VOCAB_SIZE
    out.loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    # Every component learns from the loss: catches a detached projector or encoder
    # (finite, all-zero gradients pass the line above).
    components = {name.split(".")[0] for name, _ in model.named_parameters()}
    for component in components:
        assert any(p.grad.abs().sum() > 0 for n, p in model.named_parameters()
                   if n == component or n.startswith(component + ".")), component
    first = out.loss.item()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(8):
        loss = run(model, arch, images, ids, labels, mask).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert run(model, arch, images, ids, labels, mask).loss.item() < 0.8 * first
    model.eval()
    prompts = ["What colour?", "Describe"]
    for kwargs in ({}, {"num_beams": 3}, {"do_sample": True, "seed": 7, "top_k": 20, "top_p": 0.9}):
        with_cache = generate(model, arch, images, prompts, max_new_tokens=6, use_cache=True, **kwargs)
        without = generate(model, arch, images, prompts, max_new_tokens=6, use_cache=False, **kwargs)
        assert with_cache == without, kwargs
        assert all(1 <= len(row) <= 6 for row in with_cache)


@pytest.mark.parametrize("fusion", FUSIONS)
def test_batched_prompts_of_different_lengths_match_single_prompts(fusion):
    torch.manual_seed(0)
    model = vlmkit.EncoderDecoder(tiny("encoder_decoder", "pixel_shuffle", fusion)).eval()
    images = torch.rand(3, 3, 32, 32)
    prompts = ["Hi", "A much longer question about the image?", "Mid length"]
    batched = model.generate(images, prompts, max_new_tokens=5, return_ids=True)[1]
    for i, prompt in enumerate(prompts):
        alone = model.generate(images[i:i + 1], [prompt], max_new_tokens=5, return_ids=True)[1]
        assert alone[0] == batched[i]


def test_several_images_per_sample_and_prefix_lm():
    torch.manual_seed(0)
    model = vlmkit.EncoderDecoder(tiny("encoder_decoder", "mlp", "concat", attention="prefix_lm"))
    ids, labels, mask = text.training_batch(["<image> vs <image>: which is red?", "<image>colour?"], ["left", "red"])
    out = model(torch.rand(3, 3, 32, 32), ids, mask, labels)  # 2 + 1 images in reading order
    assert torch.isfinite(out.loss)
    # 16 tokens per image replace each placeholder; image positions are ignored by the loss.
    assert out.logits.shape[1] == ids.shape[1] + 2 * 15
    assert (out.labels != -100).sum() == (labels != -100).sum()
    model.eval()
    causal = vlmkit.EncoderDecoder(tiny("encoder_decoder", "mlp", "concat", attention="causal")).eval()
    causal.load_state_dict(model.state_dict())
    images = torch.rand(3, 3, 32, 32)
    changed = ids.clone()
    changed[1, 3] += 1  # a prompt byte of sample 1: fused position 3 + 15 = 18
    with torch.no_grad():
        for m, prompt_sees_ahead in ((model, True), (causal, False)):
            before, after = m(images, ids, mask).logits, m(images, changed, mask).logits
            assert torch.allclose(before[1, :18], after[1, :18], atol=1e-6) != prompt_sees_ahead
    # Prefix-LM generation with the cache equals generation without it.
    single = torch.rand(2, 3, 32, 32)
    a = model.generate(single, ["<image>q", "<image>longer prompt"], 6, use_cache=True, return_ids=True)[1]
    b = model.generate(single, ["<image>q", "<image>longer prompt"], 6, use_cache=False, return_ids=True)[1]
    assert a == b


def test_decoder_options_rotary_learned_gated_every_n():
    torch.manual_seed(0)
    for decoder in ({"pos_embedding": "learned"}, {"cross_attention_every": 2, "gated_cross_attention": True},
                    {"tie_embeddings": False}):
        fusion = "cross_attention" if "cross_attention_every" in decoder else "concat"
        cfg = tiny("encoder_decoder", "linear", fusion)
        cfg["decoder"].update(decoder)
        model = vlmkit.build_model(cfg).eval()
        assert model.config["decoder"]["pos_embedding"] == decoder.get("pos_embedding", "rotary")
        images = torch.rand(1, 3, 32, 32)
        a = model.generate(images, ["x"], 5, use_cache=True, return_ids=True)[1]
        b = model.generate(images, ["x"], 5, use_cache=False, return_ids=True)[1]
        assert a == b
    gated = vlmkit.build_model(tiny("encoder_decoder", "linear", "cross_attention",
                                    decoder={"d_model": 32, "depth": 2, "num_heads": 4,
                                             "cross_attention_every": 1, "gated_cross_attention": True}))
    # Flamingo's gate starts closed: the image does not change the logits yet.
    ids, labels, mask = text.training_batch(["q"], ["a"])
    with torch.no_grad():
        one = gated(torch.rand(1, 3, 32, 32), ids, mask).logits
        two = gated(torch.rand(1, 3, 32, 32), ids, mask).logits
    assert torch.equal(one, two)


LLAMA_STYLE = {"norm": "rmsnorm", "mlp": "swiglu", "num_kv_heads": 2, "qk_norm": True, "rope_theta": 1e6}


@pytest.mark.parametrize("blocks", [{"norm": "rmsnorm"}, {"mlp": "swiglu"}, {"num_kv_heads": 1}, {"num_kv_heads": 2},
                                    {"qk_norm": True}, LLAMA_STYLE],
                         ids=lambda b: "-".join(f"{k}={v}" for k, v in b.items()))
@pytest.mark.parametrize("fusion", FUSIONS)
def test_todays_decoder_blocks_train_and_cache_equals_no_cache(blocks, fusion):
    torch.manual_seed(0)
    cfg = tiny("encoder_decoder", "mlp", fusion, attention="prefix_lm")
    cfg["decoder"].update(blocks, **({"cross_attention_every": 1} if fusion == "cross_attention" else {}))
    model = vlmkit.build_model(cfg)
    names = [n for n, _ in model.named_parameters() if n.startswith("decoder.blocks.0.")]
    if blocks.get("norm") == "rmsnorm":
        assert "decoder.blocks.0.norm1.weight" in names and "decoder.blocks.0.norm1.bias" not in names
    if blocks.get("mlp") == "swiglu":
        assert {"decoder.blocks.0.gate_proj.weight", "decoder.blocks.0.up_proj.weight",
                "decoder.blocks.0.down_proj.weight"} <= set(names)
    kv = blocks.get("num_kv_heads", 0)
    if kv:  # keys and values have kv heads of 8 dims
        assert model.state_dict()["decoder.blocks.0.self_attn.k_proj.weight"].shape == (kv * 8, 32)
    images = torch.rand(2, 3, 32, 32)
    ids, labels, mask = text.training_batch(PROMPTS, ANSWERS)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(8):
        loss = model(images, ids, mask, labels).loss
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert model(images, ids, mask, labels).loss.item() < 0.8 * first
    model.eval()
    for kwargs in ({}, {"num_beams": 3}):
        a = model.generate(images, ["What colour?", "Describe"], 6, use_cache=True, return_ids=True, **kwargs)[1]
        b = model.generate(images, ["What colour?", "Describe"], 6, use_cache=False, return_ids=True, **kwargs)[1]
        assert a == b, kwargs
    # The config round-trips: a model built from it has the same parameters.
    again = vlmkit.build_model(model.config)
    assert [tuple(p.shape) for p in again.parameters()] == [tuple(p.shape) for p in model.parameters()]


def test_todays_blocks_bad_settings_raise_clear_errors():
    for change, match in (({"num_kv_heads": 3}, "must divide num_heads"), ({"num_kv_heads": -1}, "num_kv_heads"),
                          ({"norm": "batchnorm"}, "unknown norm 'batchnorm'"), ({"mlp": "relu2"}, "unknown MLP")):
        cfg = tiny("encoder_decoder", "linear", "concat")
        cfg["decoder"].update(change)
        with pytest.raises(ValueError, match=match):
            vlmkit.build_model(cfg)


@pytest.mark.parametrize("case", ["concat", "cross_attention", "two_tower", "lora", "bf16", "conv_stem"])
def test_activation_checkpointing_gives_the_same_loss_and_gradients(case):
    """Recomputing each block in backward changes memory and time, not the numbers
    (under bf16 autocast too: the recomputation runs under the forward's autocast)."""
    from vlmkit import lora
    if case == "two_tower":
        from conftest import batch, tiny_config
        cfg = tiny_config("two_tower")
        images, ids = batch(4)
        run = lambda m: m(images, ids).loss
    else:
        cfg = tiny("encoder_decoder", "mlp", "cross_attention" if case == "cross_attention" else "concat",
                   attention="prefix_lm")
        if case == "cross_attention":
            cfg["decoder"]["cross_attention_every"] = 1
        if case == "conv_stem":  # the ViT's conv stem is checkpointed with its blocks
            cfg["image_encoder"]["stem"] = "conv"
        images = torch.rand(2, 3, 32, 32)
        ids, labels, mask = text.training_batch(PROMPTS, ANSWERS)
        run = lambda m: m(images, ids, mask, labels).loss
        if case == "bf16":
            def run(m):
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    return m(images, ids, mask, labels).loss.float()
    results = []
    for checkpointing in (False, True):
        c = copy.deepcopy(cfg)
        for part in ("image_encoder", "text_encoder", "decoder"):
            if part in c:
                c[part]["activation_checkpointing"] = checkpointing
        torch.manual_seed(0)
        model = vlmkit.build_model(c).train()
        if case == "lora":  # frozen embeddings: the blocks' inputs need no gradient
            lora.apply(model, rank=2)
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if "lora_B" in name:
                        p.normal_(0, 0.05)
        loss = run(model)
        loss.backward()
        results.append((loss.item(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert loss_a == pytest.approx(loss_b, abs=1e-6)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        assert grads_b[name] is not None, name
        if case == "bf16":  # recomputed in bf16 as the forward was; a float32 recomputation is far off
            scale = grads_a[name].abs().max().item() + 1e-12
            assert (grads_b[name] - grads_a[name]).abs().max().item() <= 1e-3 * scale + 1e-6, name
        else:
            torch.testing.assert_close(grads_b[name], grads_a[name], atol=1e-6, rtol=1e-5, msg=name)


def test_streaming_callback_stop_tokens_and_state_dict():
    torch.manual_seed(0)
    model = vlmkit.EncoderDecoder(tiny("encoder_decoder")).eval()
    images = torch.rand(2, 3, 32, 32)
    seen = []
    texts, ids = model.generate(images, ["a", "b"], 5, stream=lambda toks: seen.append(list(toks)), return_ids=True)
    assert len(seen) == max(len(r) for r in ids) and all(len(s) == 2 for s in seen)
    assert [s[0] for s in seen if s[0] >= 0] == ids[0]
    stopped = []
    model.generate(images, ["a", "b"], 5, stream=lambda toks: stopped.append(toks) or False)
    assert len(stopped) == 1
    first = ids[0][0]
    short = model.generate(images, ["a", "b"], 5, stop_tokens=[first], return_ids=True)[1]
    assert short[0] == [first]
    twin = vlmkit.build_model(model.config)
    twin.load_state_dict(model.state_dict())
    assert twin.eval().generate(images, ["a", "b"], 5, return_ids=True)[1] == ids


def test_bad_inputs_raise_clear_errors():
    model = vlmkit.EncoderDecoder(tiny("encoder_decoder"))
    ids, labels, mask = text.training_batch(PROMPTS, ANSWERS)
    with pytest.raises(ValueError, match=r"2 <image> placeholder\(s\).*3 image\(s\)"):
        model(torch.rand(3, 3, 32, 32), ids, mask, labels)
    with pytest.raises(ValueError, match="max_len=160"):
        model.generate(torch.rand(1, 3, 32, 32), ["x" * 200], 4)
    with pytest.raises(ValueError, match="unknown projector 'qformer'; expected one of " +
                       ", ".join(f"'{name}'" for name in vlmkit.PROJECTORS)):
        vlmkit.build_model(tiny("encoder_decoder", "qformer"))
    with pytest.raises(ValueError, match="unknown decoder fusion 'sum'"):
        vlmkit.build_model(tiny("encoder_decoder", "mlp", "sum"))
    with pytest.raises(ValueError, match="one image per prompt"):
        vlmkit.EncoderDecoder(tiny("encoder_decoder", "mlp", "cross_attention"))(torch.rand(3, 3, 32, 32), ids, mask)
    with pytest.raises(ValueError, match="concat fusion needs a decoder without cross-attention"):
        cfg = tiny("encoder_decoder")
        cfg["decoder"]["cross_attention_every"] = 1
        vlmkit.build_model(cfg)
    with pytest.raises(IndexError, match="token ids must be in"):
        model(torch.rand(2, 3, 32, 32), ids + 1000, mask)
    with pytest.raises(ValueError, match="exactly one <image> placeholder"):
        m3 = vlmkit.EncoderTextDecoder(tiny("encoder_text_decoder"))
        cids, cmask = text.encode_batch(CONTEXTS, 16)
        bad_ids, bad_labels, bad_mask = text.training_batch(["no placeholder", "<image>x"], ANSWERS)
        m3(torch.rand(2, 3, 32, 32), cids, bad_ids, cmask, bad_mask, bad_labels)
    with pytest.raises(ValueError, match="num_beams"):
        model.generate(torch.rand(1, 3, 32, 32), ["x"], 4, num_beams=0)


def test_projector_classes_come_from_the_registry():
    """Every registered projector is a vlmkit class: an nn.Module built from keyword options,
    with the documented token count, its config and options, and clear errors."""
    tokens = vlmkit.EncoderOutput(torch.randn(2, 64, 16), torch.randn(2, 16))  # an 8x8 grid
    rows = vlmkit.projector_types()
    assert [row["name"] for row in rows] == sorted(vlmkit.PROJECTORS) and rows
    for row in rows:
        cls = getattr(vlmkit, row["python_class"])
        assert row["python_class"] in vlmkit.__all__ and issubclass(cls, torch.nn.Module)
        assert row["name"] in cls.__doc__ and all(key in cls.__doc__ for key in row["defaults"])
        p = cls(16, 24, **row["defaults"])
        out = p(tokens)
        assert out.shape == (2, p.num_output_tokens(8, 8), 24), row["name"]
        assert p.config == {"type": row["name"], **row["defaults"]}
        assert p.options == {"in_dim": 16, "out_dim": 24, **row["defaults"]}
        child = vlmkit.build_model(tiny("encoder_decoder", row["name"])).projector
        assert type(child) is cls and isinstance(child.cpp_module, vlmkit.Projector)
        with pytest.raises(ValueError, match=f"unknown config key '{row['python_class']}.bogus'"):
            cls(16, 24, bogus=1)
        with pytest.raises(ValueError, match="in_dim and out_dim must be positive"):
            cls(0, 24)
        with pytest.raises(ValueError, match=r"expected image tokens of shape \[B, N, 16\]"):
            p(vlmkit.EncoderOutput(torch.randn(2, 64, 8), torch.randn(2, 8)))
    with pytest.raises(ValueError, match="unknown projector 'qformer'"):
        vlmkit._C.make_projector("qformer", 16, 24)


@pytest.mark.parametrize("fusion", FUSIONS)
def test_image_positions_tell_the_decoder_each_tokens_cell(fusion):
    """sincos2d adds the projector grid's 2D sine-cosine table to the image tokens:
    no parameters (the same weights load), the same cached and uncached generation,
    and cells (0, 1) and (1, 0) told apart."""
    torch.manual_seed(0)
    plain = vlmkit.build_model(tiny("encoder_decoder", "pixel_shuffle", fusion)).eval()
    placed = vlmkit.build_model(tiny("encoder_decoder", "pixel_shuffle", fusion, image_positions="sincos2d")).eval()
    assert placed.config["image_positions"] == "sincos2d" and plain.config["image_positions"] == "none"
    placed.load_state_dict(plain.state_dict())
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        added = placed.encode_images(images) - plain.encode_images(images)
    assert torch.allclose(added[0], added[1], atol=1e-5)  # the same table for every image
    assert not torch.allclose(added[0, 1], added[0, 2], atol=1e-2)  # cells (0, 1) and (1, 0) differ
    ids, labels, mask = text.training_batch(PROMPTS, ANSWERS)
    loss = placed(images, ids, mask, labels).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert generate(placed, "encoder_decoder", images, PROMPTS, max_new_tokens=6) == \
        generate(placed, "encoder_decoder", images, PROMPTS, max_new_tokens=6, use_cache=False)
    again = vlmkit.build_model(placed.config)
    assert again.config["image_positions"] == "sincos2d"
    # gated_sincos2d: the table times a per-channel gate that starts closed, and learns.
    gated = vlmkit.build_model(tiny("encoder_decoder", "pixel_shuffle", fusion, image_positions="gated_sincos2d"))
    missing = gated.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert missing == ["image_position_gate"]
    with torch.no_grad():
        assert torch.allclose(gated.encode_images(images), plain.encode_images(images), atol=1e-6)
    gated(images, ids, mask, labels).loss.backward()
    assert gated.image_position_gate.grad.abs().sum() > 0


def test_image_positions_refuse_what_has_no_grid():
    with pytest.raises(ValueError, match="on a grid"):
        vlmkit.build_model(tiny("encoder_decoder", "resampler", "cross_attention", image_positions="sincos2d"))
    with pytest.raises(ValueError, match="image_positions is an encoder_decoder option"):
        vlmkit.build_model(tiny("encoder_text_decoder", "mlp", "concat", image_positions="sincos2d"))
    with pytest.raises(ValueError, match="sincos2d"):
        vlmkit.build_model(tiny("encoder_decoder", "pixel_shuffle", "concat", image_positions="rope"))


@pytest.mark.parametrize("fusion", FUSIONS)
def test_loss_reductions_weigh_each_example_by_its_answer_length_as_named(fusion):
    """token: an example weighs n (its answer tokens); sample: 1; sqrt (InternVL 2.5's
    square averaging): sqrt(n). Checked against the per-token losses by hand."""
    images = torch.rand(3, 3, 32, 32)
    answers = ["red", "a blue circle beside a green square", "no"]
    ids, labels, mask = text.training_batch(["<image>Q"] * 3, answers)
    losses = {}
    for reduction in ("token", "sample", "sqrt"):
        torch.manual_seed(0)
        model = vlmkit.build_model(tiny("encoder_decoder", fusion=fusion, loss_reduction=reduction))
        out = model(images, ids, mask, labels)
        losses[reduction] = out.loss
        logits, placed = out.logits, out.labels  # labels as placed in the decoder's sequence
    per_token = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), placed[:, 1:].reshape(-1),
                                                  ignore_index=-100, reduction="none").view(3, -1)
    valid = placed[:, 1:].ne(-100).float()
    sums, n = (per_token * valid).sum(1), valid.sum(1)
    assert len(set(n.tolist())) == 3  # three answer lengths
    expected = {"token": sums.sum() / n.sum(), "sample": (sums / n).mean(),
                "sqrt": (sums / n.sqrt()).sum() / n.sqrt().sum()}
    for reduction, loss in losses.items():
        assert torch.allclose(loss, expected[reduction], rtol=1e-5), reduction
    assert len({round(v.item(), 5) for v in losses.values()}) == 3
    with pytest.raises(ValueError, match="loss reduction"):
        vlmkit.build_model(tiny("encoder_decoder", fusion=fusion, loss_reduction="mean"))
