"""The benchmark suite's peer is the same model in plain PyTorch, and the suite's
measurements run (behaviour only: speed targets are checked by `vlmkit bench`)."""
import copy

import pytest
import torch

import vlmkit
from vlmkit.bench import peers, suite
from vlmkit.train_vlm import SMALL_VLM


def configs():
    out = [vlmkit.default_config(a) for a in ("two_tower", "two_leg", "encoder_decoder")] + [SMALL_VLM]
    for proj in ("linear", "mlp", "pixel_shuffle", "patch_merger", "resampler"):
        for fusion in ("concat", "cross_attention"):
            c = vlmkit.default_config("encoder_decoder")
            c["projector"], c["fusion"] = {"type": proj}, fusion
            if fusion == "cross_attention":
                c["decoder"]["cross_attention_every"] = 2
            out.append(c)
    return out


@pytest.mark.parametrize("config", configs(), ids=lambda c: f"{c['architecture']}-{c.get('projector', {}).get('type')}-{c.get('fusion')}")
def test_peer_matches_vlmkit_parameter_shapes(config):
    model = vlmkit.build_model(config)
    peer = peers.build_peer(model.config)
    ours = sorted(tuple(p.shape) for p in model.parameters())
    theirs = sorted(tuple(p.shape) for p in peer.parameters())
    assert ours == theirs
    images, ids, labels = suite.batch_for(model.config, 2, 12)
    _, loss = peer(images, ids, labels)
    if loss is not None:
        assert torch.isfinite(loss)


def test_suite_measures_a_tiny_pair():
    tiny = copy.deepcopy(SMALL_VLM)
    tiny["image_encoder"].update(image_size=32, d_model=32, depth=1, num_heads=2)
    tiny["decoder"].update(d_model=32, depth=1, num_heads=2)
    r = suite.train_and_forward(tiny, 2, 2)
    assert r["train_ratio"] > 0 and r["train_flops"] > 0
    g = suite.generation(tiny, 1, 4, 1)
    assert g["cache"]["ratio"] > 0 and g["no_cache"]["ratio"] > 0
    # Without stop tokens both produce exactly the requested number of tokens (same work).
    model, peer, full = suite.pair(tiny)
    images, ids, _ = suite.batch_for(full, 1, 6)
    assert len(peer.generate(images, ids, 5)[0]) == 5
    assert len(peer.generate(images, ids, 5, use_cache=False)[0]) == 5
    tokens, _ = model.cpp_module.generate_ids(images, [ids[0].tolist()], max_new_tokens=5, stop_tokens=[])
    assert len(tokens[0]) == 5


def test_peer_cache_equals_no_cache():
    torch.manual_seed(0)
    tiny = copy.deepcopy(SMALL_VLM)
    tiny["image_encoder"].update(image_size=32, d_model=32, depth=1, num_heads=2)
    tiny["decoder"].update(d_model=32, depth=2, num_heads=2)
    tiny["attention"] = "causal"
    model = vlmkit.build_model(tiny)
    peer = peers.build_peer(model.config)
    images, ids, _ = suite.batch_for(model.config, 2, 6)
    assert peer.generate(images, ids, 8) == peer.generate(images, ids, 8, use_cache=False)
