"""The fused decoding step (kernels/decode.h): generation's cached steps give the
tokens and scores of the decoder's own forward for every decoder option, and
they no longer dispatch ATen ops per layer."""
import copy

import pytest
import torch

import vlmkit

BASE = {
    "architecture": "encoder_decoder",
    "image_encoder": {"image_size": 32, "patch_size": 8, "d_model": 32, "depth": 1, "num_heads": 4},
    "projector": {"type": "pixel_shuffle", "factor": 2},
    "fusion": "concat",
    "attention": "prefix_lm",
    "decoder": {"d_model": 32, "depth": 2, "num_heads": 4, "max_len": 96},
}

CASES = {
    "default": {},
    "learned positions, untied head": {"decoder": {"pos_embedding": "learned", "tie_embeddings": False}},
    "rmsnorm, swiglu, grouped-query, qk norm": {"decoder": {"norm": "rmsnorm", "mlp": "swiglu", "num_kv_heads": 2,
                                                            "qk_norm": True}},
    "gated cross-attention": {"fusion": "cross_attention", "attention": "causal",
                              "decoder": {"cross_attention_every": 1, "gated_cross_attention": True}},
    "cross-attention, one key/value head": {"fusion": "cross_attention",
                                            "decoder": {"cross_attention_every": 1, "num_kv_heads": 1}},
    "cross-attention, qk norm in both attentions": {"fusion": "cross_attention", "attention": "causal",
                                                    "decoder": {"cross_attention_every": 1, "qk_norm": True}},
}


@pytest.fixture
def decode_kernel():
    before = vlmkit.decode_kernel()
    yield vlmkit.set_decode_kernel
    vlmkit.set_decode_kernel(before)


def build(case):
    config = copy.deepcopy(BASE)
    for key, value in CASES[case].items():
        if isinstance(value, dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    torch.manual_seed(0)
    model = vlmkit.build_model(config)
    model.eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "cross_gate" in name:
                p.fill_(0.7)  # a gate of 0 would hide the cross-attention
    return model


def both(model, decode_kernel, **kwargs):
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    prompts = [[1, 3, 10, 11, 12, 13, 14], [1, 3, 20]]  # different lengths: left padding in the cache
    out = {}
    for kernel in ("aten", "auto"):
        decode_kernel(kernel)
        out[kernel] = model.cpp_module.generate_ids(images, prompts, use_cache=True, **kwargs)
    return out["aten"], out["auto"]


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("beams", [1, 3])
def test_fused_steps_give_the_tokens_and_scores_of_the_decoder(case, beams, decode_kernel):
    model = build(case)
    # Token 7 stops a row: rows finish at different steps and are fed padding.
    (ref_tokens, ref_scores), (tokens, scores) = both(model, decode_kernel, max_new_tokens=24, stop_tokens=[7],
                                                      num_beams=beams)
    assert tokens == ref_tokens
    assert scores == pytest.approx(ref_scores, abs=1e-4)


def test_an_unmerged_lora_adapter_and_autocast_take_the_reference_path(decode_kernel):
    model = build("default")
    vlmkit.lora.apply(model, rank=4, alpha=8.0, target_modules=["q_proj", "v_proj", "fc1"])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # an adapter that changes the output
    (ref_tokens, ref_scores), (tokens, scores) = both(model, decode_kernel, max_new_tokens=16, stop_tokens=[])
    assert tokens == ref_tokens and scores == pytest.approx(ref_scores, abs=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (ref_tokens, _), (tokens, _) = both(model, decode_kernel, max_new_tokens=8, stop_tokens=[])
    assert tokens == ref_tokens


def count_linear_ops(model, kernel, decode_kernel):
    decode_kernel(kernel)
    images = torch.randn(1, 3, 32, 32)
    before = vlmkit.mlp_kernel(), vlmkit.gemm_kernel()
    # The reference's MLP as two aten::linear and every Linear as at::linear (not
    # oneDNN's sgemm), so every Linear is counted.
    vlmkit.set_mlp_kernel("aten")
    vlmkit.set_gemm_kernel("aten")
    try:
        with torch.profiler.profile() as prof:
            model.cpp_module.generate_ids(images, [[1, 3, 10, 11]], max_new_tokens=20, stop_tokens=[], use_cache=True)
    finally:
        vlmkit.set_mlp_kernel(before[0])
        vlmkit.set_gemm_kernel(before[1])
    return sum(e.count for e in prof.key_averages() if e.key == "aten::linear")


def test_fused_steps_run_no_aten_linear_per_layer(decode_kernel):
    model = build("default")
    aten, fused = count_linear_ops(model, "aten", decode_kernel), count_linear_ops(model, "auto", decode_kernel)
    # The reference runs 2 layers x 6 linears for each of the 19 later steps; the
    # fused path runs only the image encoder's and the prompt's.
    assert aten - fused >= 19 * 2 * 6


def test_decode_kernel_setting(decode_kernel):
    decode_kernel("aten")
    assert vlmkit.decode_kernel() == "aten"
    with pytest.raises(ValueError, match="auto"):
        decode_kernel("fast")
    assert vlmkit.decode_kernel() == "aten"
