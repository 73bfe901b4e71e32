"""CUDA checks for the GPU machines (run by benchmarks/gpu/run.sh): every
architecture on CUDA matches CPU, trains, and generates the same tokens with and
without the KV cache; JSON-constrained output stays valid; plus GPU timings."""
import json
import sys
import time

import torch

import vlmkit
from vlmkit import text

failures = 0


def check(name, ok, detail=""):
    global failures
    failures += not ok
    print(f"CHECK {name}: {'PASS' if ok else 'FAIL'} {detail}", flush=True)


def batch(arch, device, n=4):
    g = torch.Generator().manual_seed(0)
    images = torch.rand(n, 3, 64, 64, generator=g)
    ids = torch.randint(8, 200, (n, 12), generator=g)
    if arch in ("encoder_decoder", "encoder_text_decoder"):
        ids, labels, mask = text.training_batch(["<image>What is shown?"] * n, ["a red square"] * n)
        args = [images, ids, mask, labels]
        if arch == "encoder_text_decoder":
            cids, cmask = text.encode_batch(["a picture"] * n, 64)
            args = [images, cids, ids, cmask, mask, labels]
    elif arch == "two_leg":
        args = [images, ids, None, torch.randint(0, 16, (n,), generator=g)]
    else:
        args = [images, ids]
    return [a.to(device) if isinstance(a, torch.Tensor) else a for a in args]


def main():
    assert torch.cuda.is_available(), "no CUDA device"
    dev = torch.device("cuda")
    print("torch", torch.__version__, "vlmkit", vlmkit.__version__, "built against", vlmkit.torch_version)
    for arch in vlmkit.ARCHITECTURES:
        torch.manual_seed(0)
        model = vlmkit.build_model({"architecture": arch})
        cpu_out = model(*batch(arch, "cpu"))
        model.to(dev)
        gpu_out = model(*batch(arch, dev))
        key = "logits" if hasattr(gpu_out, "logits") else "logits_per_image"
        diff = (getattr(gpu_out, key).cpu() - getattr(cpu_out, key)).abs().max().item()
        check(f"{arch} cuda matches cpu", diff < 2e-3, f"max |diff| {diff:.2e}")
        gpu_out.loss.backward()
        grads = all(p.grad is not None and p.grad.is_cuda and torch.isfinite(p.grad).all() for p in model.parameters())
        check(f"{arch} backward on cuda", grads)
    for projector in vlmkit.PROJECTORS:
        for fusion in ["concat", "cross_attention"]:
            torch.manual_seed(0)
            model = vlmkit.build_model({"architecture": "encoder_decoder", "projector": {"type": projector},
                                        "fusion": fusion}).to(dev).eval()
            images = torch.rand(3, 3, 64, 64, device=dev)
            prompts = ["What?", "A longer question here?", "Hi"]
            for kw in ({}, {"num_beams": 3}):
                a = model.generate(images, prompts, 12, use_cache=True, return_ids=True, **kw)[1]
                b = model.generate(images, prompts, 12, use_cache=False, return_ids=True, **kw)[1]
                check(f"generate cache==nocache {projector}/{fusion} {kw}", a == b)
            schema = {"type": "object", "properties": {"Object": {"type": "array", "items": {"type": "string"}},
                      "Bounding_box": {"type": "array", "items": {"type": "array", "minItems": 4, "maxItems": 4,
                                        "items": {"type": "integer", "minimum": 0, "maximum": 999}}}}}
            outs = model.generate(images, prompts, 8, schema=schema, do_sample=True, seed=0)
            try:
                ok = all(isinstance(json.loads(o), dict) for o in outs)
            except ValueError:
                ok = False
            check(f"json schema on cuda {projector}/{fusion}", ok)
    # FusedAdamW on CUDA takes the multi-tensor (foreach) path: the same steps as
    # torch.optim.AdamW, weights and moments on the device.
    torch.manual_seed(0)
    model = vlmkit.build_model({"architecture": "encoder_decoder"}).to(dev)
    twin = vlmkit.build_model({"architecture": "encoder_decoder"}).to(dev)
    twin.load_state_dict(model.state_dict())
    fused = vlmkit.FusedAdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.95), weight_decay=0.05)
    reference = torch.optim.AdamW(twin.parameters(), lr=2e-3, betas=(0.9, 0.95), weight_decay=0.05, foreach=False)
    args = batch("encoder_decoder", dev)
    initial = [p.detach().clone() for p in model.parameters()]
    for _ in range(4):
        for m, opt in ((model, fused), (twin, reference)):
            opt.zero_grad()
            m(*args).loss.backward()
            opt.step()
    worst = max((a - b).abs().max().item() for a, b in zip(model.state_dict().values(), twin.state_dict().values()))
    moved = all(p.is_cuda for p in model.parameters()) and any(
        not torch.equal(a, p) for a, p in zip(initial, model.parameters()))
    check("FusedAdamW on cuda steps like torch.optim.AdamW", worst < 1e-5 and moved, f"max |diff| {worst:.2e}")
    # Timings: default encoder-decoder training step and generation on the GPU.
    torch.manual_seed(0)
    model = vlmkit.build_model({"architecture": "encoder_decoder"}).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for bs in (1, 32):
        args = batch("encoder_decoder", dev, bs)
        for _ in range(3):
            loss = model(*args).loss
            opt.zero_grad(); loss.backward(); opt.step()
        torch.cuda.synchronize()
        start = time.perf_counter()
        steps = 20
        for _ in range(steps):
            loss = model(*args).loss
            opt.zero_grad(); loss.backward(); opt.step()
        torch.cuda.synchronize()
        print(f"TIMING train step encoder_decoder default batch {bs}: "
              f"{steps * bs / (time.perf_counter() - start):.1f} samples/s")
    model.eval()
    images = torch.rand(1, 3, 64, 64, device=dev)
    for cache in (True, False):
        model.generate(images, ["warm up"], 4, use_cache=cache)
        torch.cuda.synchronize()
        start = time.perf_counter()
        ids = model.generate(images, ["Describe the image"], 64, use_cache=cache, stop_tokens=[999 % 264],
                             return_ids=True)[1]
        torch.cuda.synchronize()
        print(f"TIMING generate batch 1 cache={cache}: {len(ids[0]) / (time.perf_counter() - start):.1f} tokens/s")
    print(f"FAILURES {failures}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
