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
    for reduction in ("token", "sample", "sqrt"):
        out.append({**copy.deepcopy(SMALL_VLM), "loss_reduction": reduction})
    for proj in vlmkit.PROJECTORS:
        for fusion in ("concat", "cross_attention"):
            c = vlmkit.default_config("encoder_decoder")
            c["projector"], c["fusion"] = {"type": proj}, fusion
            if fusion == "cross_attention":
                c["decoder"]["cross_attention_every"] = 2
            out.append(c)
    # A SigLIP-style tower (no CLS, attention-pooling head) beside an RMSNorm + SwiGLU text tower.
    tower = vlmkit.default_config("two_tower")
    tower["image_encoder"]["pool"] = "map"
    tower["text_encoder"].update(norm="rmsnorm", mlp="swiglu")
    out.append(tower)
    # Today's decoder blocks (a Llama / Qwen-style decoder), with both fusions.
    for fusion in ("concat", "cross_attention"):
        c = copy.deepcopy(SMALL_VLM)
        c["fusion"] = fusion
        c["image_encoder"].update(norm="rmsnorm", mlp="swiglu")
        c["decoder"].update(norm="rmsnorm", mlp="swiglu", num_kv_heads=2, qk_norm=True, rope_theta=1e6,
                            **({"cross_attention_every": 2} if fusion == "cross_attention" else {}))
        out.append(c)
    return out


def copied_pair(config):
    torch.manual_seed(0)
    model = vlmkit.build_model(config).eval()
    peer = peers.build_peer(model.config).eval()
    ours, theirs = list(model.named_parameters()), list(peer.named_parameters())
    assert [tuple(p.shape) for _, p in ours] == [tuple(p.shape) for _, p in theirs]
    with torch.no_grad():
        for (_, a), (_, b) in zip(ours, theirs):
            b.copy_(a)
    return model, peer


@pytest.mark.parametrize("attention", ["causal", "prefix_lm"])
@pytest.mark.parametrize("config", configs(), ids=lambda c: f"{c['architecture']}-{c.get('projector', {}).get('type')}-{c.get('fusion')}"
                         + ("-" + c["decoder"]["mlp"] if c.get("decoder", {}).get("mlp") else "")
                         + ("-" + c["image_encoder"]["pool"] if c["image_encoder"].get("pool") == "map" else ""))
def test_peer_computes_what_vlmkit_computes(config, attention):
    """With vlmkit's weights copied in, the peer's logits, loss and greedy tokens are
    vlmkit's: the suite times the same computation. Equal parameter shapes alone
    passed a peer whose prefix-LM mask differed (logits off by up to 0.14)."""
    config = copy.deepcopy(config)
    if config["architecture"] == "encoder_decoder":
        config["attention"] = attention
    elif attention == "prefix_lm":
        pytest.skip("the attention policy is a decoder setting")
    model, peer = copied_pair(config)
    images, ids, labels = suite.batch_for(model.config, 2, 12)
    with torch.no_grad():
        for with_labels in (True, False):
            lab = labels if with_labels else None
            tower = config["architecture"] == "two_tower"
            out = model(images, ids) if tower else model(images, ids, None, lab)
            logits, loss = peer(images, ids, lab)
            torch.testing.assert_close(logits, out.logits_per_image if tower else out.logits, atol=1e-5, rtol=1e-5)
            if loss is not None:
                torch.testing.assert_close(loss, out.loss, atol=1e-5, rtol=1e-5)
    if config["architecture"] == "encoder_decoder":
        tokens, _ = model.cpp_module.generate_ids(images, ids.tolist(), max_new_tokens=6, stop_tokens=[])
        assert peer.generate(images, ids, 6) == tokens


@pytest.mark.parametrize("change,what", [
    ({"architecture": "two_tower", "text_encoder": {"pool": "cls"}}, "pool"),
    ({"architecture": "two_leg", "fusion": {"type": "gated"}}, "gated"),
    ({"architecture": "encoder_decoder", "label_smoothing": 0.1}, "label_smoothing"),
])
def test_peer_refuses_what_it_does_not_implement(change, what):
    config = vlmkit.default_config(change["architecture"])
    config.update(change)
    with pytest.raises(ValueError, match=what):
        peers.build_peer(vlmkit.build_model(config).config)


def test_suite_measures_a_tiny_pair():
    tiny = copy.deepcopy(SMALL_VLM)
    tiny["image_encoder"].update(image_size=32, d_model=32, depth=1, num_heads=2)
    tiny["decoder"].update(d_model=32, depth=1, num_heads=2)
    r = suite.train_and_forward(tiny, 2, 2)
    # Ratios are vlmkit / peer throughput (> 1: vlmkit faster): catches an inverted ratio.
    rate = r["train_samples_per_s"]
    assert r["train_ratio"] == pytest.approx(rate["vlmkit"] / rate["peer"])
    assert r["forward_ratio"] == pytest.approx(r["forward_samples_per_s"]["vlmkit"] / r["forward_samples_per_s"]["peer"])
    assert r["train_flops"] == pytest.approx(3 * r["forward_flops"]) and r["forward_flops"] > 0
    g = suite.generation(tiny, 1, 4, 1)
    for mode in ("cache", "no_cache"):
        tps = g[mode]["tokens_per_s"]
        assert g[mode]["ratio"] == pytest.approx(tps["vlmkit"] / tps["peer"])
    # Without stop tokens both produce exactly the requested number of tokens (same work).
    model, peer, full = suite.pair(tiny)
    images, ids, _ = suite.batch_for(full, 1, 6)
    assert len(peer.generate(images, ids, 5)[0]) == 5
    assert len(peer.generate(images, ids, 5, use_cache=False)[0]) == 5
    tokens, _ = model.cpp_module.generate_ids(images, [ids[0].tolist()], max_new_tokens=5, stop_tokens=[])
    assert len(tokens[0]) == 5


def test_suite_times_each_side_alone():
    tiny = copy.deepcopy(SMALL_VLM)
    tiny["image_encoder"].update(image_size=32, d_model=32, depth=1, num_heads=2)
    tiny["decoder"].update(d_model=32, depth=1, num_heads=2)
    r = suite.train_alone(tiny, 2, 2, 1, "bf16")
    assert r["precision"] == "bf16"
    with pytest.raises(ValueError, match="fp32.*bf16"):
        suite.train_alone(tiny, 2, 2, 1, "fp16")
    for arm in ("vlmkit", "peer", "peer_tuned_heap"):
        assert r[arm]["step_s"] > 0 and r[arm]["faults_per_step"] >= 0
    # ratio = peer time / vlmkit time (> 1: vlmkit faster), as everywhere in the suite
    assert r["ratio"] == pytest.approx(r["peer"]["step_s"] / r["vlmkit"]["step_s"])
    assert r["ratio_same_heap"] == pytest.approx(r["peer_tuned_heap"]["step_s"] / r["vlmkit"]["step_s"])


def test_suite_device_choice_and_cpu_paths():
    # A device the suite cannot run on is refused by name, before any work.
    for bad in ("tpu", "cuda:x"):
        with pytest.raises(SystemExit, match="expected cpu, cuda or cuda:N"):
            suite.set_device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="sees no CUDA device"):
            suite.set_device("cuda")
    assert suite.DEVICE.type == "cpu"
    suite.set_device("cpu")
    tiny = copy.deepcopy(SMALL_VLM)
    tiny["image_encoder"].update(image_size=32, d_model=32, depth=1, num_heads=2)
    tiny["decoder"].update(d_model=32, depth=1, num_heads=2)
    r = suite.train_bf16(tiny, 2, 1)
    assert r["ratio"] == pytest.approx(r["train_s"]["peer"] / r["train_s"]["vlmkit"])
    prof = suite.profile_step(tiny, 2, top=5)
    assert len(prof) == 5 and all(p["share"] > 0 for p in prof) and sum(p["share"] for p in prof) <= 1 + 1e-9
    cost = suite.checkpointing_cost(tiny, 2, 1)
    assert cost["time_ratio"] == pytest.approx(cost["train_s"]["checkpointed"] / cost["train_s"]["plain"])


def test_gemm_peak_is_the_faster_librarys():
    """The share of the GEMM peak is counted against the faster of torch.mm and the
    oneDNN sgemm vlmkit's Linear runs, and the report names both."""
    g = suite.gemm_peak(quick=True)
    assert g["torch_mm"]["gflops"] > 0
    libraries = [g["torch_mm"]] + ([g["onednn"]] if "onednn" in g else [])
    assert ("onednn" in g) == vlmkit.have_dnnl_sgemm()
    assert g["gflops"] == max(r["gflops"] for r in libraries)
    assert g["source"] == ("oneDNN sgemm" if g["gflops"] == g.get("onednn", {}).get("gflops") else "torch.mm")
    assert g["source"] in suite.gemm_sources(g) and "torch.mm" in suite.gemm_sources(g)


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
