"""ONNX export: onnx's checker, then ONNX Runtime itself (run by Node, the npm
package scripts/setup.sh installs) at other batch sizes and lengths than the
export traced: logits within 1e-4 of vlmkit's and greedy generation with the
KV cache token for token."""
import copy
import json
import os
import shutil
import subprocess

import pytest
import torch

import vlmkit
from vlmkit import export, lora, text
from vlmkit.train_vlm import SMALL_VLM

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOLS = os.path.join(ROOT, "tools", "onnxruntime")
ORT_MODULES = os.path.join(ROOT, ".cache", "onnxruntime-node", "node_modules")
HAVE_ORT = shutil.which("node") is not None and os.path.exists(os.path.join(ORT_MODULES, "onnxruntime-node"))
needs_ort = pytest.mark.skipif(not HAVE_ORT, reason="node + onnxruntime-node not installed (scripts/setup.sh)")


def _node(script, *args):
    env = dict(os.environ, NODE_PATH=ORT_MODULES)
    done = subprocess.run(["node", os.path.join(TOOLS, script), *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr


def _tensor(t):
    t = t.contiguous()
    kind = "int64" if t.dtype == torch.long else "float32"
    return {"type": kind, "dims": list(t.shape), "data": t.flatten().tolist()}


def _run(tmp_path, directory, graph, **inputs):
    src, dst = tmp_path / f"{graph}-in.json", tmp_path / f"{graph}-out.json"
    src.write_text(json.dumps({k: _tensor(v) for k, v in inputs.items()}))
    _node("run.js", directory, graph, src, dst)
    return {k: torch.tensor(v["data"]).view(v["dims"]) for k, v in json.loads(dst.read_text()).items()}


def _prompts(n, length, vocab=200):
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(4, vocab, (n, length), generator=g)
    ids[:, 0] = text.BOS
    ids[torch.arange(n), 1 + torch.arange(n) % 3] = text.IMAGE  # <image> at different places per row
    return ids


def _generative_configs():
    theta = copy.deepcopy(SMALL_VLM)
    theta["decoder"]["rope_theta"] = 1e6
    out = [("small_vlm", SMALL_VLM), ("rope_theta_1e6", theta)]
    for fusion in ("concat", "cross_attention"):  # today's blocks: RMSNorm, SwiGLU, GQA, QK-norm
        llama = copy.deepcopy(SMALL_VLM)
        llama["fusion"] = fusion
        llama["decoder"].update(norm="rmsnorm", mlp="swiglu", num_kv_heads=2, qk_norm=True, rope_theta=5e5,
                                **({"cross_attention_every": 1} if fusion == "cross_attention" else {}))
        if fusion == "concat":  # keeps the prefix-LM export covered (SMALL_VLM's mask is causal)
            llama["attention"] = "prefix_lm"
        out.append((f"llama_style-{fusion}", llama))
    for projector in vlmkit.PROJECTORS:
        for fusion in ("concat", "cross_attention"):
            c = vlmkit.default_config("encoder_decoder")
            c["projector"], c["fusion"] = {"type": projector}, fusion
            c["decoder"] = dict(c["decoder"], depth=2)
            if fusion == "cross_attention":
                c["decoder"]["cross_attention_every"] = 1
            out.append((f"{projector}-{fusion}", c))
    return out


def test_export_checks_with_onnx_and_refuses_what_it_cannot_mirror(tmp_path):
    import onnx  # Debian's python3-onnx, installed by scripts/setup.sh

    spec = export.onnx(vlmkit.build_model(SMALL_VLM), str(tmp_path / "vlm"))
    assert set(spec["graphs"]) == {"vision", "embed", "prefill", "decode"}
    for g in spec["graphs"].values():
        onnx.checker.check_model(onnx.load(str(tmp_path / "vlm" / g["file"])))
    assert json.loads((tmp_path / "vlm" / "export.json").read_text())["depth"] == SMALL_VLM["decoder"]["depth"]
    gated = copy.deepcopy(vlmkit.default_config("encoder_decoder"))
    gated["fusion"], gated["decoder"]["gated_cross_attention"] = "cross_attention", True
    gated["decoder"]["cross_attention_every"] = 1
    with pytest.raises(NotImplementedError, match="gated_cross_attention"):
        export.onnx(vlmkit.build_model(gated), str(tmp_path / "gated"))
    conv = vlmkit.default_config("encoder_decoder")
    conv["image_encoder"] = {"type": "conv", "image_size": 32, "channels": [16, 32], "d_model": 32}
    with pytest.raises(NotImplementedError, match="image encoder 'conv'"):
        export.onnx(vlmkit.build_model(conv), str(tmp_path / "conv"))
    with pytest.raises(TypeError, match="vlmkit model"):
        export.onnx(torch.nn.Linear(2, 2), str(tmp_path / "x"))


@needs_ort
@pytest.mark.parametrize("name,config", _generative_configs(), ids=[n for n, _ in _generative_configs()])
def test_generative_export_in_onnx_runtime_equals_vlmkit(name, config, tmp_path):
    torch.manual_seed(0)
    model = vlmkit.build_model(config).eval()
    directory = tmp_path / "export"
    spec = export.onnx(model, str(directory))
    size = spec["image_size"]
    images = torch.rand(3, 3, size, size)  # the export traced batch 2 and other lengths
    ids = _prompts(3, 11, spec["vocab_size"])
    request = tmp_path / "request.json"
    request.write_text(json.dumps({"images": _tensor(images), "input_ids": ids.tolist(), "max_new_tokens": 8}))
    _node("generate.js", directory, request, tmp_path / "out.json")
    result = json.loads((tmp_path / "out.json").read_text())
    with torch.no_grad():
        expected = model(images, ids).logits
    got = torch.tensor(result["prefill_logits"]["data"]).view(result["prefill_logits"]["dims"])
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() < 1e-4
    tokens, _ = model.cpp_module.generate_ids(images, ids.tolist(), max_new_tokens=8, stop_tokens=[])
    assert result["tokens"] == tokens


@needs_ort
@pytest.mark.parametrize("fusion", ["concat", "cross_attention"])
def test_encoder_text_decoder_export_in_onnx_runtime_equals_vlmkit(fusion, tmp_path):
    torch.manual_seed(0)
    config = vlmkit.default_config("encoder_text_decoder")
    config["fusion"] = fusion
    config["decoder"] = dict(config["decoder"], depth=2, **({"cross_attention_every": 1}
                                                             if fusion == "cross_attention" else {}))
    model = vlmkit.build_model(config).eval()
    spec = export.onnx(model, str(tmp_path / "export"))
    assert "encode" in spec["graphs"] and "vision" not in spec["graphs"]
    size = spec["image_size"]
    # Concat packs each row's valid memory into its prompt: rows need equal context lengths
    # there; cross-attention masks padded context positions, so one row is padded.
    n = 3 if fusion == "cross_attention" else 1
    images = torch.rand(n, 3, size, size)
    context = torch.randint(8, 200, (n, 11))
    if n > 1:
        context[1, 8:] = 0
    ids = _prompts(n, 10, spec["vocab_size"])
    request = tmp_path / "request.json"
    request.write_text(json.dumps({"images": _tensor(images), "context_ids": context.tolist(),
                                   "input_ids": ids.tolist(), "max_new_tokens": 8}))
    _node("generate.js", tmp_path / "export", request, tmp_path / "out.json")
    result = json.loads((tmp_path / "out.json").read_text())
    with torch.no_grad():
        expected = model(images, context, ids).logits
    got = torch.tensor(result["prefill_logits"]["data"]).view(result["prefill_logits"]["dims"])
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() < 1e-4
    tokens, _ = model.cpp_module.generate_ids(images, context, ids.tolist(), max_new_tokens=8, stop_tokens=[])
    assert result["tokens"] == tokens


@needs_ort
@pytest.mark.parametrize("arch", ["two_tower", "two_leg", "siglip_style"])
def test_encoder_exports_in_onnx_runtime_equal_vlmkit(arch, tmp_path):
    torch.manual_seed(0)
    config = vlmkit.default_config("two_tower" if arch == "siglip_style" else arch)
    if arch == "siglip_style":  # no CLS, attention pooling; an RMSNorm + SwiGLU text tower
        config["image_encoder"]["pool"] = "map"
        config["text_encoder"].update(norm="rmsnorm", mlp="swiglu")
        arch = "two_tower"
    model = vlmkit.build_model(config).eval()
    spec = export.onnx(model, str(tmp_path / "export"))
    size = spec["image_size"]
    images = torch.rand(3, 3, size, size)
    ids = torch.randint(4, 200, (3, 13))
    ids[0, 9:] = 0  # padding
    with torch.no_grad():
        out = model(images, ids)
    img = _run(tmp_path, tmp_path / "export", "image_encoder", images=images)
    txt = _run(tmp_path, tmp_path / "export", "text_encoder", input_ids=ids)
    if arch == "two_tower":
        assert (img["image_embeds"] - out.image_embeds).abs().max() < 1e-4
        assert (txt["text_embeds"] - out.text_embeds).abs().max() < 1e-4
        logits = spec["logit_scale"] * img["image_embeds"] @ txt["text_embeds"].t()
        assert (logits - out.logits_per_image).abs().max() < 1e-3  # scale ~14 times the 1e-4 above
    else:
        both = _run(tmp_path, tmp_path / "export", "model", images=images, input_ids=ids)
        assert (both["logits"] - out.logits).abs().max() < 1e-4


@needs_ort
def test_lora_model_exports_with_adapters_merged(tmp_path):
    torch.manual_seed(0)
    model = vlmkit.build_model(SMALL_VLM).eval()
    lora.apply(model, rank=4)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    spec = export.onnx(model, str(tmp_path / "export"))
    assert lora.layers(model) and not lora.merged(model)  # the model itself is untouched
    images, ids = torch.rand(2, 3, 64, 64), _prompts(2, 9, spec["vocab_size"])
    request = tmp_path / "request.json"
    request.write_text(json.dumps({"images": _tensor(images), "input_ids": ids.tolist(), "max_new_tokens": 4}))
    _node("generate.js", tmp_path / "export", request, tmp_path / "out.json")
    result = json.loads((tmp_path / "out.json").read_text())
    with torch.no_grad():
        expected = model(images, ids).logits
    got = torch.tensor(result["prefill_logits"]["data"]).view(result["prefill_logits"]["dims"])
    assert (got - expected).abs().max().item() < 1e-4


def test_cli_export_of_a_checkpoint(tmp_path, capsys):
    from vlmkit import checkpoint, cli
    path = checkpoint.save_model(str(tmp_path / "ckpt"), vlmkit.build_model(SMALL_VLM))
    assert cli.main(["export", "--checkpoint", path, "--output", str(tmp_path / "onnx")]) == 0
    printed = capsys.readouterr().out
    assert "prefill.onnx" in printed and "decode.onnx" in printed
    assert (tmp_path / "onnx" / "export.json").exists()
    assert cli.main(["export", "--checkpoint", path, "--format", "tflite"]) == 2
    assert "only 'onnx'" in capsys.readouterr().err
    gated = vlmkit.default_config("encoder_decoder")
    gated["fusion"] = "cross_attention"
    gated["decoder"].update(gated_cross_attention=True, cross_attention_every=1)
    refused = checkpoint.save_model(str(tmp_path / "gated"), vlmkit.build_model(gated))
    assert cli.main(["export", "--checkpoint", refused, "--output", str(tmp_path / "x")]) == 2
    assert "gated_cross_attention" in capsys.readouterr().err
