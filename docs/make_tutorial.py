# Generates docs/tutorial.ipynb (outputs stripped): edit the cells here, then run
# /usr/bin/python3 docs/make_tutorial.py
import nbformat as nbf
nb = nbf.v4.new_notebook()
md, code = nbf.v4.new_markdown_cell, nbf.v4.new_code_cell
cells = [
md("""# vlmkit tutorial: four architectures, a small VLM trained with `torch.optim`

This notebook installs nothing: it imports the `vlmkit` package built by `make install`
(README). It builds each of the four architectures, trains a small encoder-decoder VLM on
the built-in synthetic multitask data with a plain PyTorch loop, shows predictions with
boxes drawn, plots the loss, and saves a checkpoint that the C++ library can load.

`VLMKIT_TUTORIAL_STEPS` sets the number of training steps (default 300, a few minutes
on 2 cores; the test that executes this notebook uses fewer)."""),
code("""import json, math, os, time
import matplotlib
matplotlib.use("Agg")  # headless runs; in Jupyter the figures still display inline
import matplotlib.pyplot as plt
import torch
import vlmkit
from vlmkit import data

print("vlmkit", vlmkit.__version__, "on LibTorch", vlmkit.torch_version, "| threads:", vlmkit.thread_info())
STEPS = int(os.environ.get("VLMKIT_TUTORIAL_STEPS", "300"))
WORK = os.environ.get("VLMKIT_TUTORIAL_DIR", "tutorial_run")"""),
md("""## 1. The four architectures

Every model is a `torch.nn.Module` backed by C++; `vlmkit.default_config(name)` shows
every option. Projectors (`linear`, `mlp`, `pixel_shuffle`, `patch_merger`, `resampler`)
and fusions (`concat`, `cross_attention`) are chosen by name."""),
code("""images = torch.randn(2, 3, 32, 32)
tokens = torch.randint(8, 200, (2, 12))
tokens[:, 1] = 3  # the <image> placeholder for concatenation fusion
vit = {"image_size": 32, "patch_size": 8, "d_model": 32, "depth": 1, "num_heads": 2}
text = {"d_model": 32, "depth": 1, "num_heads": 2}
decoder = {"d_model": 32, "depth": 1, "num_heads": 2}
two_tower = vlmkit.build_model({"architecture": "two_tower", "image_encoder": vit, "text_encoder": text})
two_leg = vlmkit.build_model({"architecture": "two_leg", "image_encoder": vit, "text_encoder": text,
                              "head": {"type": "classification", "num_classes": 4}})
enc_txt_dec = vlmkit.build_model({"architecture": "encoder_text_decoder", "text_encoder": text, "decoder": decoder,
                                  "image_encoder": {"type": "conv", "image_size": 32, "channels": [16, 32],
                                                    "d_model": 32}})
enc_dec = vlmkit.build_model({"architecture": "encoder_decoder", "image_encoder": vit, "decoder": decoder,
                              "projector": {"type": "mlp"}, "fusion": "concat"})
print("two_tower loss", two_tower(images, tokens).loss.item())
print("two_leg logits", tuple(two_leg(images, tokens).logits.shape))
print("encoder_text_decoder logits", tuple(enc_txt_dec(images, tokens, tokens).logits.shape))
print("encoder_decoder logits", tuple(enc_dec(images, tokens).logits.shape))
for name, m in [("two_tower", two_tower), ("two_leg", two_leg), ("encoder_text_decoder", enc_txt_dec),
                ("encoder_decoder", enc_dec)]:
    print(f"{name:22s} {sum(p.numel() for p in m.parameters()):8d} parameters")"""),
md("""## 2. Data: the synthetic multitask set

Each scene yields a caption, colour / shape / count / spatial questions, OCR, detection and
JSON extraction. It is written as PNG files + a JSONL manifest and read by the C++ loader."""),
code("""from vlmkit.train_vlm import write_task_manifest
manifest = write_task_manifest(os.path.join(WORK, "data"), scenes=400, seed=0, image_size=64)
examples = [json.loads(l) for l in open(manifest)]
print(len(examples), "examples, e.g.")
for e in examples[:4]:
    print(" ", e["kind"], "|", e["question"], "->", e["answer"])
loader = data.Loader(manifest, batch_size=16, num_workers=2, image_size=64, seed=0, drop_last=True)
batch = next(iter(loader))
print({k: tuple(v.shape) for k, v in batch.items()})"""),
md("""## 3. Train with a plain `torch.optim` loop

The vlmkit model is an `nn.Module`: AdamW, schedulers and clipping are PyTorch's own.
(`vlmkit.Trainer` runs the same loop in C++, with checkpoints and resume.)"""),
code("""torch.manual_seed(0)
config = {"architecture": "encoder_decoder",
          "image_encoder": {"type": "vit", "image_size": 64, "patch_size": 8, "d_model": 96, "depth": 2,
                            "num_heads": 4, "stem": "conv"},
          "projector": {"type": "pixel_shuffle", "factor": 2}, "fusion": "concat", "attention": "prefix_lm",
          "decoder": {"d_model": 96, "depth": 3, "num_heads": 4, "max_len": 256}}
model = vlmkit.build_model(config)
decay = [p for p in model.parameters() if p.dim() >= 2]
no_decay = [p for p in model.parameters() if p.dim() < 2]
optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
                              lr=1e-3)
warmup = max(1, STEPS // 10)  # linear warmup, then cosine decay
scheduler = torch.optim.lr_scheduler.LambdaLR(
    optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, STEPS) / STEPS)))
losses, step, start = [], 0, time.time()
model.train()
while step < STEPS:
    for batch in loader:
        out = model(batch["images"], batch["input_ids"], batch["padding_mask"], batch["labels"])
        optimizer.zero_grad()
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(out.loss.item())
        step += 1
        if step % 50 == 0 or step == STEPS:
            print(f"step {step}/{STEPS}  loss {losses[-1]:.3f}  {16 * step / (time.time() - start):.0f} samples/s")
        if step == STEPS:
            break"""),
code("""fig, ax = plt.subplots(figsize=(6, 3))
ax.plot(losses)
ax.set_xlabel("step"); ax.set_ylabel("loss"); ax.set_yscale("log"); ax.grid(alpha=0.3)
fig.savefig(os.path.join(WORK, "tutorial_loss.png"))
plt.show()"""),
md("""## 4. Predictions, with boxes drawn

Generation is greedy; detection and extraction are constrained to a JSON schema, so they
always parse. Boxes come back on a 0..999 grid (`vlmkit.parse_boxes` maps them to pixels)."""),
code("""from vlmkit.train_vlm import DETECTION_SCHEMA, PROMPTS
model.eval()
scenes = data.SyntheticDataset(4, image_size=64, seed=123)
fig, axes = plt.subplots(1, 4, figsize=(14, 4))
for i, ax in enumerate(axes):
    sample = scenes[i]
    pixels, _ = data.preprocess(sample["image"], 64, "square", normalize="clip")
    caption = model.generate(pixels[None], [data.chat_prompt("<image>" + PROMPTS["caption"])], 80)[0]
    detection = model.generate(pixels[None], [data.chat_prompt("<image>" + PROMPTS["detection"])], 160,
                               schema=DETECTION_SCHEMA)[0]
    boxes = vlmkit.parse_boxes(detection, 64, 64)
    labels = json.loads(detection).get("Object", [])[:len(boxes)]
    drawn = data.plot_bounding_boxes(sample["image"], boxes, labels + [""] * (len(boxes) - len(labels)))
    ax.imshow(drawn.numpy()); ax.axis("off")
    ax.set_title(caption[:40] + "\\n(truth: " + sample["caption"][:30] + ")", fontsize=8)
    print("predicted:", caption, "| detection:", detection)
fig.savefig(os.path.join(WORK, "tutorial_predictions.png"))
plt.show()"""),
md("""### Segmentation: masks as polygons

A segmentation answer is an outline per object on the same 0..999 grid
(`{"Object": [...], "Polygon": [[x1, y1, x2, y2, ...]]}`, docs/generation.md). The synthetic
scenes carry each object's exact mask; `data.plot_masks` fills each outline translucent,
outlines and labels it. Left: the truth (masks traced to 12-vertex outlines); right: what
the model writes when asked to segment the same object, with its mask IoU."""),
code("""from vlmkit.metrics import mask_iou
from vlmkit.train_vlm import SEGMENTATION_SCHEMA
sample = scenes[0]
target = sample["objects"][0]["label"]
truth = [data.mask_to_polygon(m) for m in sample["masks"]]
pixels, _ = data.preprocess(sample["image"], 64, "square", normalize="clip")
answer = model.generate(pixels[None], [data.chat_prompt(f"<image>Segment the {target}.")], 160,
                        schema=SEGMENTATION_SCHEMA)[0]
predicted = vlmkit.parse_polygons(answer, 64, 64)
iou = mask_iou(data.polygon_to_mask(predicted, 64, 64), sample["masks"][0]) if predicted else 0.0
fig, axes = plt.subplots(1, 2, figsize=(7, 3.5))
axes[0].imshow(data.plot_masks(sample["image"], truth, [o["label"] for o in sample["objects"]]).numpy())
axes[0].set_title("truth", fontsize=9)
axes[1].imshow(data.plot_masks(sample["image"], predicted, [target] * len(predicted)).numpy())
axes[1].set_title(f"'Segment the {target}.'  mask IoU {iou:.2f}", fontsize=9)
for ax in axes:
    ax.axis("off")
fig.savefig(os.path.join(WORK, "tutorial_masks.png"))
print("answer:", answer)
plt.show()"""),
md("""## 5. Save a checkpoint (loads in C++ too)

`vlmkit.checkpoint.save` writes config, safetensors weights, optimizer state and the RNG
state atomically, with SHA-256 sums. `examples/caption.cpp` loads it with
`vlmkit::load_model` and captions an image."""),
code("""path = vlmkit.checkpoint.save(WORK, model, optimizer, step=STEPS)
print(path, sorted(os.listdir(path)))
reloaded = vlmkit.load_model(path)
pixels, _ = data.preprocess(scenes[0]["image"], 64, "square", normalize="clip")
ids = torch.tensor([vlmkit.ByteTokenizer().encode(data.chat_prompt("<image>Describe the image."))])
assert torch.equal(reloaded(pixels[None], ids).logits, model(pixels[None], ids).logits)
print("reloaded model gives identical logits")"""),
md("""## 6. Dynamic resolution: images of different sizes in one batch

`preprocess(..., mode="dynamic")` keeps each image's aspect (sides multiples of patch x
merge, Qwen2-VL style), so a wide picture gets more image tokens than a small one.
`collate_images` pads them into one batch and returns `image_sizes`; the model masks the
padded patches and packs only each image's own tokens into the sequence, so every image
gets exactly what it would get alone. The Loader does the same with `resize="dynamic"`."""),
code("""wide = torch.rand(60, 200, 3).mul(255).to(torch.uint8)
tall = torch.rand(180, 70, 3).mul(255).to(torch.uint8)
views = [data.preprocess(img, 64, mode="dynamic", patch_size=8, merge_size=2)[0] for img in (wide, tall)]
batch, sizes = data.collate_images(views)
print("sizes", sizes.tolist(), "-> padded batch", tuple(batch.shape))
dyn = vlmkit.build_model({"architecture": "encoder_decoder", "image_encoder": vit, "decoder": decoder,
                          "projector": {"type": "pixel_shuffle", "factor": 2}, "fusion": "concat"})
dyn.eval()
prompt = torch.tensor([vlmkit.ByteTokenizer().encode(data.chat_prompt("<image>Describe the image."))] * 2)
out = dyn(batch, prompt, image_sizes=sizes)
for i, view in enumerate(views):
    alone = dyn(view[None], prompt[:1]).logits[0]
    same = torch.allclose(out.logits[i, :alone.shape[0]], alone, atol=1e-5)
    print(f"image {i}: {alone.shape[0] - prompt.shape[1] + 1} image tokens, equal to the image alone: {same}")"""),
]
nb["cells"] = cells
nb["metadata"] = {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
                  "language_info": {"name": "python"}}
nbf.write(nb, __import__("os").path.join(__import__("os").path.dirname(__file__), "tutorial.ipynb"))
