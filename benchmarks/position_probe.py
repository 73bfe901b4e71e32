"""Is an object's place readable from the tokens the decoder sees?

    .venv/bin/python benchmarks/position_probe.py [--checkpoint DIR] [--pretrain-steps 400]
        [--pos-embedding learned|sincos2d] [--json out.json]

Spatial questions, captions (objects named left to right), extraction (its
description is the caption) and boxes all need the decoder to know where each
object is. With a checkpoint: probes its image encoder and projector. Without:
builds the default small VLM (optionally with another position table), runs
stage 1 of `vlmkit train` (its objective: VlmRun.pretrain_objective) and probes that.

Probes (single-object scenes, 800 to fit, 400 held out; logistic regression as in
benchmarks/probes.py): the object's column (which quarter of the image its centre
is in, chance 0.25) and its shape (chance 0.25), from the max-pooled and the
mean-pooled tokens of the encoder and of the projector (at random initialisation
when no checkpoint is given: the VLM stage trains it). Max pooling keeps only what
each token's content says, not which token said it: a column read from max-pooled
tokens is a place written into the token's content, which is what a decoder
reading the object's token through attention gets.

With a checkpoint it also asks the question cross-attention raises: the decoder
attends to its memory as a set, so a projected token's own cell (row, column of the
projector's grid) is known to it only from the token's content. own_cell/* read
each token's row and column from that token alone (scenes as in training, 300 fit,
200 held out), apart for tokens over an object (>= 25% covered) and background;
with image_positions "sincos2d" the grid's table is part of the content.
"""
import argparse
import json
import sys
import time

import torch

import vlmkit
from vlmkit import checkpoint, data
from vlmkit.train_vlm import SMALL_VLM, VlmRun, pretrain_image_encoder

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from probes import features, logistic_probe, publish  # noqa: E402


def single_object_columns(n, seed, size):
    dataset = data.SyntheticDataset(n, image_size=size, seed=seed, min_shapes=1, max_shapes=1, word_probability=0.0)
    images, columns, shapes = [], [], []
    names = data.SyntheticDataset.shapes
    for i in range(n):
        sample = dataset[i]
        images.append(data.preprocess(sample["image"], size, "square", normalize="clip")[0])
        x1, _, x2, _ = sample["objects"][0]["box"]
        columns.append(min(3, int(2 * (x1 + x2) / size)))
        shapes.append(names.index(sample["objects"][0]["label"].split()[1]))
    return torch.stack(images), torch.tensor(columns), torch.tensor(shapes)


def probe(model, size, seed=0):
    train_x, train_col, train_shape = single_object_columns(800, seed + 30_000, size)
    test_x, test_col, test_shape = single_object_columns(400, seed + 40_000, size)
    tr, te = features(model, train_x), features(model, test_x)
    out = {}
    for where in ("encoder", "projected"):
        for pool in ("max", "mean"):
            f = (lambda t: t.max(1).values) if pool == "max" else (lambda t: t.mean(1))
            out[f"column/{where}/{pool}"] = logistic_probe(f(tr[where]), train_col, f(te[where]), test_col, 4)
            out[f"shape/{where}/{pool}"] = logistic_probe(f(tr[where]), train_shape, f(te[where]), test_shape, 4)
    return out


def own_cell(model, size, seed=0):
    tokens, covers = [], []
    for n, offset in ((300, 50_000), (200, 60_000)):
        dataset = data.SyntheticDataset(n, image_size=size, seed=seed + offset)
        images, cover = [], []
        for i in range(n):
            sample = dataset[i]
            images.append(data.preprocess(sample["image"], size, "square", normalize="clip")[0])
            cover.append(sample["masks"].amax(0).float() if sample["masks"].numel() else torch.zeros(size, size))
        memory = features(model, torch.stack(images))["projected"]
        m = memory.shape[1]
        g = int(round(m ** 0.5))
        if g * g != m:
            raise SystemExit(f"own_cell: {m} projected tokens are not a square grid")
        cover = torch.stack(cover).view(n, g, size // g, g, size // g).mean((2, 4)).reshape(n * m)
        tokens.append(memory.reshape(n * m, -1))
        covers.append(cover)
    cells = [torch.arange(m).repeat(len(t) // m) for t in tokens]
    out = {}
    for what, label in (("row", lambda c: c // g), ("column", lambda c: c % g)):
        for part, keep in (("object", lambda c: c >= 0.25), ("background", lambda c: c < 0.25)):
            k0, k1 = keep(covers[0]), keep(covers[1])
            out[f"own_cell/{what}/{part}"] = logistic_probe(tokens[0][k0], label(cells[0])[k0], tokens[1][k1],
                                                            label(cells[1])[k1], g)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint")
    parser.add_argument("--pretrain-steps", type=int, default=400)
    parser.add_argument("--pos-embedding", choices=("learned", "sincos2d"), default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json")
    args = parser.parse_args()
    vlmkit.apply_default_threads()
    torch.manual_seed(args.seed)
    result = {}
    if args.checkpoint:
        model = checkpoint.load_model(args.checkpoint)
        result["source"] = args.checkpoint
    else:
        config = json.loads(json.dumps(SMALL_VLM))
        if args.pos_embedding:
            config["image_encoder"]["pos_embedding"] = args.pos_embedding
        model = vlmkit.build_model(config)
        start = time.perf_counter()
        if args.pretrain_steps > 0:
            result.update(pretrain_image_encoder(model, 3000, args.seed, args.pretrain_steps, verbose=False,
                                                objective=VlmRun.pretrain_objective))
        result["source"] = f"stage 1, {args.pretrain_steps} steps, positions {config['image_encoder'].get('pos_embedding', 'learned')}"
        result["stage1_seconds"] = time.perf_counter() - start
    model.eval()
    result.update(probe(model, model.config["image_encoder"]["image_size"], args.seed))
    if args.checkpoint:
        result.update(own_cell(model, model.config["image_encoder"]["image_size"], args.seed))
    publish(result, args.json)


if __name__ == "__main__":
    main()
