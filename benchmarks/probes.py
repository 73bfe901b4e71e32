"""Probes of what `vlmkit train`'s model learns, for docs/training.md ("Causes").

    .venv/bin/python benchmarks/probes.py --checkpoint runs/vlm [--json out.json]

1. Linear probes: is shape identity linearly readable from the image encoder's
   tokens and from the projected tokens the decoder sees? Single-object scenes,
   logistic regression on mean- and max-pooled tokens, 800 scenes to fit and 400
   held out, for the checkpoint and for the same config at random initialisation.
2. Where the model looks when it answers a shape question: the share of the
   input-gradient mass of the answer's log-probability that falls inside the box of
   the object the question names, against the share of the image that box covers.
3. What each task contributes to the loss: with the token-mean loss every label
   token weighs the same, so a task's share of the gradient follows its share of
   label tokens (measured on the training examples, and on real Loader batches).
4. Padding: the share of text positions in the Loader's batches that hold no token.
5. With --capacity: the same image encoder trained on shape alone, for comparison
   with what the VLM made of it.
6. Which wrong answers: each colour and shape question of the validation scenes
   answered by greedy decoding, the misses split into "another object's" (the
   colour or shape of an object the question does not name: a look-up of the
   wrong object) and "absent" (none in the scene), and accuracy by object count.
"""
import argparse
import collections
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import vlmkit
from vlmkit import ConvStage, ViT, checkpoint, data, text
from vlmkit.train_vlm import SMALL_VLM, scene_tasks


def encoder_of(model):
    config = {k: v for k, v in model.config["image_encoder"].items() if k != "type"}
    encoder = ViT(**config) if model.config["image_encoder"].get("type", "vit") == "vit" else ConvStage(**config)
    state = {k[len("image_encoder."):]: v for k, v in model.state_dict().items() if k.startswith("image_encoder.")}
    encoder.load_state_dict(state)
    return encoder.eval()


def single_object_scenes(n, seed, size):
    dataset = data.SyntheticDataset(n, image_size=size, seed=seed, min_shapes=1, max_shapes=1, word_probability=0.0)
    images, shapes = [], []
    names = data.SyntheticDataset.shapes
    for i in range(n):
        sample = dataset[i]
        images.append(data.preprocess(sample["image"], size, "square", normalize="clip")[0])
        shapes.append(names.index(sample["objects"][0]["label"].split()[1]))
    return torch.stack(images), torch.tensor(shapes)


def logistic_probe(train_x, train_y, test_x, test_y, classes, steps=300):
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    probe = torch.nn.Linear(train_x.shape[1], classes)
    opt = torch.optim.LBFGS(probe.parameters(), lr=0.5, max_iter=steps)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(probe(train_x), train_y) + 1e-3 * probe.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return (probe(test_x).argmax(1) == test_y).float().mean().item()


@torch.no_grad()
def features(model, images):
    encoder = encoder_of(model)
    tokens = torch.cat([encoder(images[i:i + 64]).tokens for i in range(0, len(images), 64)])
    projected = torch.cat([model.cpp_module.encode_images(images[i:i + 64]) for i in range(0, len(images), 64)])
    return {"encoder": tokens, "projected": projected}


def probe_shapes(model, size, seed):
    train_x, train_y = single_object_scenes(800, seed + 30_000, size)
    test_x, test_y = single_object_scenes(400, seed + 40_000, size)
    classes = len(data.SyntheticDataset.shapes)
    out = {}
    tr, te = features(model, train_x), features(model, test_x)
    for where in ("encoder", "projected"):
        for pool in ("mean", "max"):
            f = (lambda t: t.mean(1)) if pool == "mean" else (lambda t: t.max(1).values)
            out[f"{where}/{pool}"] = logistic_probe(f(tr[where]), train_y, f(te[where]), test_y, classes)
    return out


def encoder_alone(model_config, seconds=45.0, seed=0):
    """Capacity check: the same image encoder (fresh), trained on shape alone
    (single-object scenes, max-pooled tokens, linear head, AdamW 1e-3, batch 64) for
    a time budget; held-out accuracy and the steps it took."""
    size = model_config["image_encoder"]["image_size"]
    train_x, train_y = single_object_scenes(3000, seed + 30_000, size)
    test_x, test_y = single_object_scenes(400, seed + 40_000, size)
    torch.manual_seed(seed)
    encoder = encoder_of(vlmkit.build_model(model_config)).train()
    head = torch.nn.Linear(model_config["image_encoder"]["d_model"], len(data.SyntheticDataset.shapes))
    opt = torch.optim.AdamW(list(encoder.parameters()) + list(head.parameters()), lr=1e-3)
    g = torch.Generator().manual_seed(seed)
    start, steps = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        i = torch.randint(0, len(train_x), (64,), generator=g)
        loss = F.cross_entropy(head(encoder(train_x[i]).tokens.max(1).values), train_y[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
        steps += 1
    encoder.eval()
    with torch.no_grad():
        accuracy = (head(encoder(test_x).tokens.max(1).values).argmax(1) == test_y).float().mean().item()
    return {"held_out_shape_accuracy": accuracy, "steps": steps, "seconds": seconds}


def saliency(model, size, seed, scenes=60):
    """Share of |d log p(answer) / d pixels| inside the asked object's box."""
    dataset = data.SyntheticDataset(scenes, image_size=size, seed=seed + 50_000)
    inside, area = [], []
    model.eval()
    for i in range(scenes):
        sample = dataset[i]
        q = next(q for q in sample["questions"] if q["kind"] == "shape")
        colour = q["question"][len("What shape is "):-1]
        obj = next(o for o in sample["objects"] if o["label"].split()[0] == colour)
        pixels = data.preprocess(sample["image"], size, "square", normalize="clip")[0][None].requires_grad_(True)
        prompt = data.chat_prompt("<image>" + q["question"])
        # As in training: <bos> prompt, then the answer and its <eos> as the labels.
        answer = text.encode(q["answer"], add_bos=False, add_eos=True)
        ids = torch.tensor([text.encode(prompt, add_bos=True, add_eos=False) + answer])
        n_answer = len(answer)
        labels = torch.full_like(ids, -100)
        labels[0, -n_answer:] = ids[0, -n_answer:]
        loss = model(pixels, ids, None, labels).loss
        (grad,) = torch.autograd.grad(-loss, pixels)
        mass = grad.abs().sum(1)[0]  # [H, W]
        x1, y1, x2, y2 = [int(round(v)) for v in obj["box"]]
        inside.append((mass[y1:y2, x1:x2].sum() / mass.sum()).item())
        area.append((x2 - x1) * (y2 - y1) / (size * size))
    return {"saliency_in_asked_box": statistics.mean(inside), "asked_box_area": statistics.mean(area)}


def task_shares(manifest_dir, size, batch_size=32, batches=40):
    """Share of examples and of label tokens per task, in the training examples and
    in real Loader batches; the padded share of text positions."""
    from vlmkit.train_vlm import task_manifest_path
    # The examples file the run trained on: with every object's outline (the default
    # since the fourteenth session) and every pair's spatial question, or without.
    candidates = [task_manifest_path(manifest_dir, every_object=o, every_pair=p)
                  for o, p in ((True, True), (True, False), (False, True), (False, False))]
    manifest = next((p for p in candidates if os.path.exists(p)), None)
    if manifest is None:
        raise FileNotFoundError(f"probes: no examples file in '{manifest_dir}' (looked for {candidates})")
    examples, tokens = collections.Counter(), collections.Counter()
    with open(manifest) as f:
        for line in f:
            e = json.loads(line)
            examples[e["kind"]] += 1
            tokens[e["kind"]] += len(text.encode(e["answer"], add_bos=False, add_eos=True))  # answer + <eos>
    total_e, total_t = sum(examples.values()), sum(tokens.values())
    out = {"examples": {k: v / total_e for k, v in sorted(examples.items())},
           "label_tokens": {k: v / total_t for k, v in sorted(tokens.items())},
           "label_tokens_per_example": {k: tokens[k] / examples[k] for k in sorted(examples)}}
    loader = data.Loader(manifest, batch_size=batch_size, num_workers=1, image_size=size, seed=0, drop_last=True)
    real, positions = 0, 0
    for n, batch in enumerate(loader):
        if n == batches:
            break
        real += int((~batch["padding_mask"]).sum()) if batch["padding_mask"].dtype == torch.bool else int(batch["padding_mask"].sum())
        positions += batch["input_ids"].numel()
    out["padded_text_positions"] = 1 - real / positions
    return out


def question_errors(model, size, scenes=200):
    """Item 6 on the validation scenes (offset VALIDATION_SEED_OFFSET): per kind,
    {"right", "another_object", "absent"} counts and accuracy by objects per scene."""
    from vlmkit.train_vlm import VALIDATION_SEED_OFFSET
    dataset = data.SyntheticDataset(scenes, image_size=size, seed=VALIDATION_SEED_OFFSET)
    rows = []
    for i in range(scenes):
        sample = dataset[i]
        pixels, _ = data.preprocess(sample["image"], size, "square", normalize="clip")
        rows += [(pixels, t, sample) for t in scene_tasks(sample) if t["kind"] in ("colour", "shape")]
    out = {k: {"right": 0, "another_object": 0, "absent": 0, "by_objects": {}} for k in ("colour", "shape")}
    with torch.no_grad():
        for start in range(0, len(rows), 32):
            part = rows[start:start + 32]
            answers = model.generate(torch.stack([p for p, _, _ in part]),
                                     [data.chat_prompt("<image>" + t["question"]) for _, t, _ in part], 12)
            for answer, (_, task, sample) in zip(answers, part):
                kind = out[task["kind"]]
                word = 0 if task["kind"] == "colour" else 1
                present = {o["label"].split()[word] for o in sample["objects"]}
                right = answer == task["answer"]
                kind["right" if right else "another_object" if answer in present else "absent"] += 1
                seen = kind["by_objects"].setdefault(str(len(sample["objects"])), [0, 0])
                seen[0] += right
                seen[1] += 1
    for kind in out.values():
        kind["by_objects"] = {n: round(r / t, 3) for n, (r, t) in sorted(kind["by_objects"].items())}
    return out


def publish(result, path=None):
    """Prints a probe's result as JSON, and writes it to `path` when given."""
    print(json.dumps(result, indent=1))
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=1)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default="runs/vlm")
    parser.add_argument("--data", help="the run's synthetic data folder (default: found under the checkpoint's run)")
    parser.add_argument("--json")
    parser.add_argument("--capacity", action="store_true",
                        help="also train the same image encoder on shape alone for 45 s (encoder_alone)")
    args = parser.parse_args()
    torch.manual_seed(0)
    trained = checkpoint.load_model(args.checkpoint) if os.path.exists(args.checkpoint) else None
    if trained is None:
        sys.exit(f"no checkpoint at {args.checkpoint} (run `make train` first)")
    size = trained.config["image_encoder"]["image_size"]
    random_init = vlmkit.build_model(trained.config)
    report = {"probe_trained": probe_shapes(trained, size, 0), "probe_random_init": probe_shapes(random_init, size, 0),
              "saliency_trained": saliency(trained, size, 0), "question_errors": question_errors(trained, size)}
    if args.capacity:
        report["encoder_alone_on_shape"] = encoder_alone(trained.config)
    folder = args.data or next((os.path.join(args.checkpoint, d) for d in sorted(os.listdir(args.checkpoint))
                                if d.startswith("synthetic-")), None)
    if folder:
        report["tasks"] = task_shares(folder, size)
    publish(report, args.json)


if __name__ == "__main__":
    main()
