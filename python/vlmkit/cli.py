"""The `vlmkit` command: train, eval, predict."""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Any, Dict, List, Optional

TASKS = ("caption", "vqa", "ocr", "detect", "segment", "extract")


class CliError(Exception):
    """An error shown as one line, without a traceback."""


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    message = text[0] if text else type(error).__name__
    # C++ errors may carry "Exception raised from ..." context after the message.
    return message.split(" (Exception raised from")[0]


def _print_metrics(metrics: Dict[str, Any]) -> None:
    print("\nmetric                          value")
    for key, value in metrics.items():
        if isinstance(value, (int, float)):
            print(f"{key:30s}  {value:10.4f}")


def _model_flags(args: argparse.Namespace) -> List[str]:
    """The flags given that shape the small VLM's model (_model_config); a model taken
    from --from, and the Two-Tower and Two-Leg recipes, have no use for them."""
    given = {"--projector": args.projector, "--fusion": args.fusion, "--image-size": args.image_size,
             "--d-model": args.d_model, "--depth": args.depth, "--image-positions": args.image_positions,
             "--loss-reduction": args.loss_reduction, "--qk-norm": args.qk_norm is not None,
             "--activation-checkpointing": args.activation_checkpointing}
    return [flag for flag, value in given.items() if value]


def _model_config(args: argparse.Namespace) -> Dict[str, Any]:
    from .train_vlm import SMALL_VLM
    import copy

    config = copy.deepcopy(SMALL_VLM)
    config["architecture"] = args.architecture
    if args.projector:
        config["projector"] = {"type": args.projector}
        if args.projector == "resampler":  # learned queries lie on no grid
            config["image_positions"] = "none"
    if args.image_positions:
        config["image_positions"] = args.image_positions
    if args.architecture != "encoder_decoder":
        config.pop("image_positions", None)
    if args.fusion:
        config["fusion"] = args.fusion
        if args.fusion == "concat":  # image tokens in the sequence, read with a prefix-LM mask
            config["attention"] = "prefix_lm"
    if args.image_size:
        config["image_encoder"]["image_size"] = args.image_size
    if args.d_model:
        config["image_encoder"]["d_model"] = config["decoder"]["d_model"] = args.d_model
    if args.depth:
        config["decoder"]["depth"] = args.depth
    if args.loss_reduction:
        config["loss_reduction"] = args.loss_reduction
    if args.qk_norm is not None:
        config["decoder"]["qk_norm"] = args.qk_norm
    if args.activation_checkpointing:
        config["image_encoder"]["activation_checkpointing"] = config["decoder"]["activation_checkpointing"] = True
    return config


def _init_distributed() -> bool:
    """Joins the torch.distributed group that torchrun (or --nproc) set up."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return True


def _launch(args: argparse.Namespace, argv: List[str]) -> int:
    """`--nproc N`: re-runs this command under PyTorch's own launcher (torchrun)."""
    from torch.distributed import run as torchrun

    rest: List[str] = []
    skip = False
    for a in argv:  # everything but --nproc N / --nproc=N
        if skip or a == "--nproc" or a.startswith("--nproc="):
            skip = a == "--nproc"
            continue
        rest.append(a)
    torchrun.main([f"--nproc_per_node={args.nproc}", "--master_addr=127.0.0.1",
                   f"--master_port={args.master_port}", "-m", "vlmkit", *rest])
    return 0


def _train(args: argparse.Namespace, argv: List[str]) -> int:
    if args.nproc > 1:
        return _launch(args, argv)
    from . import set_num_threads, thread_info

    before = thread_info()
    try:
        return _train_with_threads(args, set_num_threads, thread_info)
    finally:  # the thread policy is the command's, not the caller's (in-process callers, tests)
        set_num_threads(before["torch_threads"], before["blas_threads"])


def _train_with_threads(args: argparse.Namespace, set_num_threads, thread_info) -> int:
    from .train_vlm import resolve_precision

    precision = resolve_precision(args.precision) if args.architecture == "encoder_decoder" else "fp32"
    if precision == "bf16":
        # bf16 matrix products run on torch's intra-op threads (oneDNN), not OpenBLAS's:
        # give torch the cores (docs/benchmarks.md has the bf16 GEMM figures).
        cores = args.threads or os.cpu_count() or 1
        set_num_threads(cores, 1)
    elif args.threads:
        set_num_threads(1, args.threads)
    distributed = _init_distributed()
    import torch.distributed as dist

    rank = dist.get_rank() if distributed else 0
    info = thread_info()
    if rank == 0:
        print(f"threads: torch {info['torch_threads']}, {info['blas']} {info['blas_threads']}")
    if args.architecture in ("two_tower", "two_leg"):
        # The small recipes on the toy shapes or the real digits (docs/training.md).
        if args.architecture == "two_tower":
            from .train_two_tower import TwoTowerRun as Run, train as train_small
        else:
            from .train_two_leg import TwoLegRun as Run, train as train_small
        if _model_flags(args):
            raise CliError(f"{' '.join(_model_flags(args))}: options of the encoder-decoder's model; the "
                           f"{args.architecture} recipe builds its own (docs/training.md)")
        if args.data not in ("synthetic", "shapes", "digits"):
            raise CliError(f"--data for {args.architecture}: 'shapes' (the toy pairing; the default) or 'digits' "
                           "(real handwritten digits from Debian's python3-sklearn)")
        run = Run(steps=args.steps or Run.steps, batch_size=args.batch_size or Run.batch_size, lr=args.lr or Run.lr,
                  seed=args.seed, data="digits" if args.data == "digits" else "shapes")
        output = args.output or f"runs/{args.architecture}"
        metrics = train_small(run, out_dir=output)
        _print_metrics(metrics)
        print(f"\ncheckpoint: {output}/model.pt (config: {output}/config.json, metrics: {output}/metrics.json)")
        return 0
    if args.architecture != "encoder_decoder":
        raise CliError(f"architecture {args.architecture!r} has no training recipe in `vlmkit train` yet; "
                       "available: 'encoder_decoder', 'two_tower', 'two_leg' (any model trains with vlmkit.Trainer "
                       "and a loss function from Python or C++)")
    from .train_vlm import VlmRun, run_task_weights, train

    if args.data != "synthetic" and not args.data.endswith(".jsonl"):
        raise CliError("--data: 'synthetic' or a tasks .jsonl file (one {\"image\", \"question\", \"answer\"} per "
                       "line); convert LLaVA/COCO files with vlmkit.data.read_records")
    if args.lora_rank < 0:
        raise CliError(f"--lora-rank must be >= 0, got {args.lora_rank}")
    if args.encoder_lr < 0:
        raise CliError(f"--encoder-lr must be >= 0, got {args.encoder_lr}")
    if args.pretrain_rank_weight is not None and not (args.pretrain_rank_weight >= 0
                                                     and math.isfinite(args.pretrain_rank_weight)):
        raise CliError(f"--pretrain-rank-weight must be a finite number >= 0, got {args.pretrain_rank_weight}")
    if args.pretrain_rank_weight and args.pretrain_objective == "tags":
        raise CliError("--pretrain-rank-weight weighs a head of the dense stage 1; --pretrain-objective tags has none")
    if args.warmup < -1:
        raise CliError(f"--warmup must be >= 0, got {args.warmup}")
    if args.decay_fraction is not None and not 0 < args.decay_fraction <= 1:
        raise CliError(f"--decay-fraction must be in (0, 1], got {args.decay_fraction}")
    if args.lora_rank and not args.init_from:
        raise CliError("--lora-rank fine-tunes a trained model: name it with --from CHECKPOINT")
    if args.init_from and _model_flags(args):
        raise CliError(f"--from uses the checkpoint's model; drop {' '.join(_model_flags(args))}")
    task_weights = None
    if args.task_weights is not None:
        # Named kinds change the data's default weights (run_task_weights); '' sets
        # every kind to 1.
        task_weights = {} if not args.task_weights.strip() else \
            run_task_weights(VlmRun(data="" if args.data == "synthetic" else args.data))
        for item in (t for t in args.task_weights.split(",") if t):
            kind, sep, value = item.partition("=")
            try:
                task_weights[kind.strip()] = float(value)
            except ValueError:
                sep = ""
            if not sep or not kind.strip():
                raise CliError(f"--task-weights: expected KIND=WEIGHT[,KIND=WEIGHT...], got {item!r}")
    run = VlmRun(steps=args.steps or VlmRun.steps, batch_size=args.batch_size or VlmRun.batch_size,
                 lr=args.lr or VlmRun.lr, seed=args.seed, train_scenes=args.scenes,
                 eval_scenes=args.eval_scenes, checkpoint_every=args.checkpoint_every,
                 pretrain_steps=args.pretrain_steps if args.pretrain_steps >= 0 else VlmRun.pretrain_steps,
                 pretrain_objective=args.pretrain_objective or VlmRun.pretrain_objective,
                 pretrain_rank_weight=(VlmRun.pretrain_rank_weight if args.pretrain_rank_weight is None
                                       else args.pretrain_rank_weight),
                 freeze=VlmRun.freeze if args.freeze is None else tuple(c for c in args.freeze.split(",") if c),
                 encoder_lr=args.encoder_lr, warmup=args.warmup if args.warmup >= 0 else VlmRun.warmup,
                 decay_fraction=VlmRun.decay_fraction if args.decay_fraction is None else args.decay_fraction,
                 data="" if args.data == "synthetic" else args.data, init_from=args.init_from,
                 lora_rank=args.lora_rank, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                 lora_targets=tuple(t for t in args.lora_targets.split(",") if t) or VlmRun.lora_targets,
                 precision=precision, pack_to=args.pack_to, segment_every_object=args.segment_every_object,
                 spatial_every_pair=args.spatial_every_pair,
                 **({} if task_weights is None else {"task_weights": task_weights}))
    output = args.output or ("runs/lora" if args.lora_rank else "runs/vlm")
    metrics = train(run, config=None if args.init_from else _model_config(args), out_dir=output,
                    resume=not args.no_resume, verbose=True)
    if rank == 0:
        _print_metrics(metrics)
        print(f"\ncheckpoint: {output}/checkpoints/latest  log: {output}/metrics.jsonl  "
              f"plot: {output}/loss.png  metrics: {output}/eval.json")
        if args.lora_rank:
            print(f"adapter: {output}/adapter (vlmkit.lora.load onto {args.init_from})")
    if distributed:
        dist.destroy_process_group()
    return 0


def _load(path: str):
    from .checkpoint import load_model

    if not os.path.exists(path):
        raise CliError(f"no checkpoint at '{path}'")
    model = load_model(path)
    model.eval()
    return model


def _eval(args: argparse.Namespace, argv: List[str]) -> int:
    from .train_vlm import evaluate

    model = _load(args.checkpoint)
    config = model.config
    if config.get("architecture") != "encoder_decoder":
        raise CliError(f"vlmkit eval handles encoder_decoder checkpoints, this one is {config.get('architecture')!r}")
    size = config["image_encoder"]["image_size"]
    if args.data == "synthetic":
        from .train_vlm import TEST_SEED_OFFSET, VlmRun, majority_answers
        baselines = majority_answers(VlmRun.train_scenes, args.seed, size)
        metrics = evaluate(model, args.scenes, args.seed + TEST_SEED_OFFSET, size, baselines=baselines,
                           unconstrained=True)
    else:
        metrics = _evaluate_file(model, args.data, args.format, size, args.limit)
    _print_metrics(metrics)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(metrics, f, indent=2)
    return 0


def _evaluate_file(model, path: str, format: str, size: int, limit: int) -> Dict[str, float]:
    """Exact match, character error rate and BLEU-4 of the first answer of each record;
    for records whose answer is a segmentation JSON ("Polygon"), also mask IoU per
    object matched by label (``segment/mean_iou``) and mask AP@0.5 (``segment/mask_map50``),
    against the record's polygons (or its answer's when it has none)."""
    import torch

    from . import data, parse_polygons
    from .metrics import average_precision, bleu4, char_error_rate, mask_iou, segmentation_scores
    from .train_vlm import SEGMENTATION_SCHEMA

    records, report = data.read_records(path, format, bad_samples="skip")
    if report.get("skipped"):
        print(f"skipped {report['skipped']} malformed records", file=sys.stderr)
    pairs = []
    for r in records[:limit] if limit else records:
        turns = r["turns"]
        user = next((t for t in turns if t[0] == "user"), None)
        answer = next((t for t in turns if t[0] == "assistant"), None)
        if user is None or answer is None:
            continue
        picture = data.load_image(r["image"])
        pixels, _ = data.preprocess(picture, size, "square", normalize="clip")
        question = user[1] if "<image>" in user[1] else "<image>" + user[1]
        try:
            segmentation = "Polygon" in json.loads(answer[1])
        except (ValueError, TypeError):
            segmentation = False
        pairs.append((pixels, question, answer[1], segmentation, r, tuple(picture.shape[:2])))
    if not pairs:
        raise CliError(f"{path}: no record with a question and an answer to evaluate")
    outputs = [""] * len(pairs)
    for segmentation in (False, True):
        chosen = [i for i, p in enumerate(pairs) if p[3] == segmentation]
        for start in range(0, len(chosen), 16):
            part = chosen[start:start + 16]
            texts = model.generate(torch.stack([pairs[i][0] for i in part]),
                                   [data.chat_prompt(pairs[i][1]) for i in part], 192 if segmentation else 96,
                                   schema=SEGMENTATION_SCHEMA if segmentation else None)
            for i, text in zip(part, texts):
                outputs[i] = text
    truths = [p[2] for p in pairs]
    metrics = {"records": float(len(pairs)),
               "exact_match": sum(o == t for o, t in zip(outputs, truths)) / len(pairs),
               "cer": sum(char_error_rate(o, t) for o, t in zip(outputs, truths)) / len(pairs),
               "bleu4": bleu4(outputs, truths)}
    ious, predictions, truth_masks = [], [], []
    for image_id, (p, out) in enumerate(zip(pairs, outputs)):
        if not p[3]:
            continue
        (height, width), record = p[5], p[4]
        truth_value = json.loads(p[2])
        if record["polygons"] and len(record["labels"]) == len(record["polygons"]):
            truth = list(zip(record["labels"], record["polygons"]))
        else:
            truth = list(zip(truth_value.get("Object", []), parse_polygons(p[2], width, height)))
        truth = [(l, data.polygon_to_mask([poly], height, width)) for l, poly in truth]
        try:
            said = json.loads(out).get("Object", [])
        except (ValueError, AttributeError):
            said = []
        predicted = [(said[k] if k < len(said) and isinstance(said[k], str) else "",
                      data.polygon_to_mask([poly], height, width))
                     for k, poly in enumerate(parse_polygons(out, width, height))]
        predictions += [(image_id, l, m, -k) for k, (l, m) in enumerate(predicted)]
        truth_masks += [(image_id, l, m) for l, m in truth]
        scores = segmentation_scores(predicted, truth)
        if scores:
            ious.append(sum(scores) / len(scores))
    if ious:
        metrics["segment/mean_iou"] = sum(ious) / len(ious)
        metrics["segment/mask_map50"] = average_precision(predictions, truth_masks, 0.5, iou=mask_iou)
    return metrics


def _predict(args: argparse.Namespace, argv: List[str]) -> int:
    from . import data
    from .train_vlm import DETECTION_SCHEMA, EXTRACTION_SCHEMA, PROMPTS, labelled_boxes

    model = _load(args.checkpoint)
    config = model.config
    if config.get("architecture") != "encoder_decoder":
        raise CliError(f"vlmkit predict handles encoder_decoder checkpoints, this one is "
                       f"{config.get('architecture')!r}")
    if not os.path.isfile(args.image):
        raise CliError(f"no image file '{args.image}'")
    image = data.load_image(args.image)
    size = config["image_encoder"]["image_size"]
    pixels, _ = data.preprocess(image, size, "square", normalize="clip")
    task_prompt = {"caption": PROMPTS["caption"], "ocr": PROMPTS["ocr"], "detect": PROMPTS["detection"],
                   "extract": PROMPTS["extraction"], "vqa": None, "segment": ""}[args.task]
    prompt = args.prompt or task_prompt
    if prompt is None:
        raise CliError("--task vqa needs --prompt 'your question'")
    if args.task == "segment" and args.schema:
        raise CliError("--task segment writes the segmentation JSON; --schema does not apply")
    if args.task == "segment":
        return _predict_segment(model, image, pixels, args)
    schema = None
    if args.schema:
        try:
            with open(args.schema) as f:
                schema = json.load(f)
        except OSError as e:
            raise CliError(f"cannot read schema '{args.schema}': {e.strerror}")
        except ValueError as e:
            raise CliError(f"schema '{args.schema}' is not valid JSON: {e}")
    elif args.task == "detect":
        schema = DETECTION_SCHEMA
    elif args.task == "extract":
        schema = EXTRACTION_SCHEMA
    max_new = args.max_new_tokens or (160 if schema else 96)
    text = model.generate(pixels.unsqueeze(0), [data.chat_prompt("<image>" + prompt)], max_new, schema=schema)[0]
    print(text)
    if args.task == "detect":
        height, width = int(image.shape[0]), int(image.shape[1])
        try:
            value = json.loads(text)
        except ValueError:
            value = None
        named = labelled_boxes(text, value, width, height)
        labels, boxes = [l for l, _ in named], [b for _, b in named]
        out = args.output or os.path.splitext(args.image)[0] + ".boxes.png"
        data.plot_bounding_boxes(image, boxes, labels, path=out)
        print(f"boxes drawn: {out}", file=sys.stderr)
    return 0


def _predict_segment(model, image, pixels, args) -> int:
    """--task segment: with --prompt ("Segment the red circle.") one answer; without,
    detect the objects, then ask for each detected label's outline (the
    default model learns to segment a named object). Prints the segmentation JSON of every
    outline and draws them."""
    from . import data, parse_polygons
    from .train_vlm import DETECTION_SCHEMA, PROMPTS, SEGMENTATION_SCHEMA, labelled_boxes

    height, width = int(image.shape[0]), int(image.shape[1])
    max_new = args.max_new_tokens or 160

    def ask(prompt: str, schema) -> str:
        return model.generate(pixels.unsqueeze(0), [data.chat_prompt("<image>" + prompt)], max_new, schema=schema)[0]

    if args.prompt:
        prompts_to_ask = [args.prompt]
    else:
        text = ask(PROMPTS["detection"], DETECTION_SCHEMA)
        try:
            value = json.loads(text)
        except ValueError:
            value = None
        found = [label for label, _ in labelled_boxes(text, value, width, height)]
        labels = list(dict.fromkeys(l for l in found if l.strip()))
        if not labels:
            raise CliError("the model detected no object to segment; pass --prompt 'Segment the <object>.'")
        prompts_to_ask = [f"Segment the {label}." for label in labels]
    names, outlines = [], []
    for prompt in prompts_to_ask:
        answer = ask(prompt, SEGMENTATION_SCHEMA)
        try:
            said = json.loads(answer).get("Object", [])
        except (ValueError, AttributeError):
            said = []
        for rank, polygon in enumerate(parse_polygons(answer, width, height)):
            names.append(str(said[rank]) if rank < len(said) else "")
            outlines.append(polygon)
    print(data.segmentation_answer(names, outlines, width, height) if outlines else
          json.dumps({"Object": [], "Polygon": []}))
    out = args.output or os.path.splitext(args.image)[0] + ".masks.png"
    data.plot_masks(image, outlines, names, path=out)
    print(f"masks drawn: {out}", file=sys.stderr)
    return 0


def _bench(args: argparse.Namespace, argv: List[str]) -> int:
    from .bench.suite import main as suite_main

    rest = ["--out", args.out] + (["--quick"] if args.quick else []) + (["--skip-loader"] if args.skip_loader else [])
    return suite_main(rest)


def _export(args: argparse.Namespace, argv: List[str]) -> int:
    from . import export

    if args.format != "onnx":
        raise CliError(f"--format {args.format!r}: only 'onnx' is built")
    model = _load(args.checkpoint)
    output = args.output or os.path.join(args.checkpoint.rstrip("/") or ".", "onnx")
    try:
        spec = export.onnx(model, output, opset=args.opset)
    except NotImplementedError as e:
        raise CliError(str(e))
    for name, graph in spec["graphs"].items():
        print(f"{os.path.join(output, graph['file'])}  {graph['bytes'] / 1e6:.1f} MB  "
              f"({', '.join(graph['inputs'])} -> {', '.join(graph['outputs'][:3])}"
              f"{', ...' if len(graph['outputs']) > 3 else ''})")
    print(f"{os.path.join(output, 'export.json')}  (mirror checked against the model: max difference "
          f"{spec['mirror_max_difference']:.1e}; run it with tools/onnxruntime, docs/deploy.md)")
    return 0


_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")  # vlmkit.lora.DEFAULT_TARGETS (not imported: keeps --help fast)


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="vlmkit", description="Vision-language models on LibTorch.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a small model on the built-in data")
    p.add_argument("--architecture", default="encoder_decoder", help="encoder_decoder (default), two_tower or two_leg")
    from . import PROJECTORS
    p.add_argument("--projector", default="", choices=("",) + PROJECTORS, metavar="NAME",
                   help=f"one of {', '.join(PROJECTORS)} (default: the recipe's)")
    p.add_argument("--fusion", default="", help="cross_attention (default) or concat")
    p.add_argument("--image-size", type=int, default=0)
    p.add_argument("--d-model", type=int, default=0, help="width of image encoder and decoder")
    p.add_argument("--depth", type=int, default=0, help="decoder layers")
    p.add_argument("--data", default="synthetic",
                   help="synthetic (default) or a tasks .jsonl file (docs/finetune.md); two_tower and two_leg: shapes "
                        "(the toy pairing, default) or digits (real handwritten digits)")
    p.add_argument("--from", dest="init_from", default="",
                   help="fine-tune this checkpoint's model (a run folder or checkpoint directory)")
    p.add_argument("--lora-rank", type=int, default=0, help="LoRA: train rank-R adapters only (needs --from)")
    p.add_argument("--lora-alpha", type=float, default=16.0, help="LoRA scale numerator (output x alpha / rank)")
    p.add_argument("--lora-dropout", type=float, default=0.0)
    p.add_argument("--lora-targets", default=",".join(_LORA_TARGETS),
                   help="comma-separated Linear layers to adapt (names or dotted suffixes, * wildcards)")
    p.add_argument("--steps", type=int, default=0,
                   help="optimizer steps (0: the default: 3000 in bf16, 1000 in fp32, 1000 for two_tower)")
    p.add_argument("--batch-size", type=int, default=0, help="global batch size")
    p.add_argument("--lr", type=float, default=0.0)
    p.add_argument("--scenes", type=int, default=3000, help="synthetic training scenes (encoder_decoder)")
    p.add_argument("--eval-scenes", type=int, default=200, help="held-out (test split) synthetic scenes evaluated at the end")
    p.add_argument("--checkpoint-every", type=int, default=100)
    p.add_argument("--pretrain-steps", type=int, default=-1,
                   help="stage 1: image-encoder steps on the scene tags before the VLM stage "
                        "(default: the run's, see docs/training.md; 0: off)")
    p.add_argument("--pretrain-objective", choices=["tags", "dense"], default=None,
                   help="stage 1's targets: dense (the scene tags, and per image token the class and box of the "
                        "object under it) or tags (the scene tags alone); default: the run's (docs/training.md)")
    p.add_argument("--pretrain-rank-weight", type=float, default=None,
                   help="weight of the dense stage 1's width-rank head (per image token, the width rank of the "
                        "object under it); 0: no such head; default: the run's (docs/training.md)")
    p.add_argument("--freeze", default=None,
                   help="comma-separated components the VLM stage does not train (default: the run's; '' for none)")
    p.add_argument("--encoder-lr", type=float, default=0.0,
                   help="learning rate of the image encoder in the VLM stage when --freeze leaves it trainable "
                        "(default 0: the run's --lr)")
    p.add_argument("--warmup", type=int, default=-1, help="warmup steps of the VLM stage (default: the run's)")
    p.add_argument("--decay-fraction", type=float, default=None,
                   help="share of the VLM stage's steps, at the end, that the cosine decay spans; the rate holds "
                        "at --lr before it (1: cosine over the whole stage; default: the run's, 0.2, warmup-stable-decay)")
    p.add_argument("--image-positions", choices=["none", "sincos2d", "gated_sincos2d"], default=None,
                   help="grid positions added to the projected image tokens (default: the small VLM's, sincos2d)")
    p.add_argument("--qk-norm", action=argparse.BooleanOptionalAction, default=None,
                   help="RMSNorm of each head's queries and keys in the decoder's self- and cross-attention "
                        "(default: on, the small VLM's; --no-qk-norm leaves it out; docs/training.md, "
                        "\"QK-norm as the default\")")
    p.add_argument("--loss-reduction", choices=["token", "sample", "sqrt"], default=None,
                   help="mean over all label tokens, per example then over examples, or each token weighted "
                        "1/sqrt(its example's tokens) (default: the recipe's)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="bf16: bfloat16 autocast (float32 weights and optimizer state), torch threads on every core; "
                        "auto (default): bf16 where the CPU has native bf16 (AVX-512 BF16, AMX) or on CUDA")
    p.add_argument("--activation-checkpointing", action="store_true",
                   help="recompute each encoder and decoder block in backward (less memory, ~1.2x step time)")
    p.add_argument("--pack-to", type=int, default=-1,
                   help="sequence packing: each batch's examples share rows of at most this many decoder positions "
                        "(default -1: the decoder's max_len; 0: one example per row)")
    p.add_argument("--task-weights", default=None,
                   help="sampling weight per task kind in the VLM stage, e.g. detection=0.5,colour=2 (kinds not named "
                        "keep the default: on the synthetic data spatial=2,detection=2,segment=1.5,count=0.5,ocr=0.5, "
                        "elsewhere 1; '' for all 1)")
    p.add_argument("--segment-every-object", action=argparse.BooleanOptionalAction, default=None,
                   help="synthetic scenes: train on a segment example for every object of a scene, not only the "
                        "one it asks about (default: on for the synthetic scenes; docs/training.md)")
    p.add_argument("--spatial-every-pair", action=argparse.BooleanOptionalAction, default=None,
                   help="synthetic scenes: train on a spatial question for every ordered pair of objects apart, "
                        "not only the one the scene asks (default: off; docs/training.md)")
    p.add_argument("--no-resume", action="store_true", help="start over even if OUTPUT has a checkpoint")
    p.add_argument("--threads", type=int, default=0, help="BLAS threads (default: every core)")
    p.add_argument("--nproc", type=int, default=1, help="data-parallel processes on this machine (torchrun)")
    p.add_argument("--master-port", type=int, default=29511)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default="")
    p.set_defaults(func=_train)

    p = sub.add_parser("eval", help="evaluate a checkpoint")
    p.add_argument("--checkpoint", required=True, help="a checkpoint directory or a run folder")
    p.add_argument("--data", default="synthetic", help="synthetic (held-out scenes) or a dataset file")
    p.add_argument("--format", default="jsonl", help="jsonl, llava, coco_captions, coco_instances, coco_segmentation")
    p.add_argument("--scenes", type=int, default=200, help="held-out (test split) synthetic scenes")
    p.add_argument("--limit", type=int, default=0, help="evaluate at most this many records of a file")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default="", help="also write the metrics to this file")
    p.set_defaults(func=_eval)

    p = sub.add_parser("predict", help="run a checkpoint on one image")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--image", required=True)
    p.add_argument("--task", choices=TASKS, default="caption")
    p.add_argument("--prompt", default="", help="the question (vqa) or a prompt replacing the task's")
    p.add_argument("--schema", default="", help="JSON schema file: constrain the output to it")
    p.add_argument("--max-new-tokens", type=int, default=0)
    p.add_argument("--output", default="",
                   help="detect / segment: where to write the image with boxes / masks "
                        "(default: IMAGE.boxes.png / IMAGE.masks.png)")
    p.set_defaults(func=_predict)

    p = sub.add_parser("export", help="export a checkpoint for deployment (ONNX)")
    p.add_argument("--checkpoint", required=True, help="a checkpoint directory or a run folder")
    p.add_argument("--format", default="onnx", help="onnx")
    p.add_argument("--output", default="", help="folder for the graphs (default: CHECKPOINT/onnx)")
    p.add_argument("--opset", type=int, default=14)
    p.set_defaults(func=_export)

    p = sub.add_parser("bench", help="benchmark vlmkit beside a plain-PyTorch peer")
    p.add_argument("--quick", action="store_true", help="quick mode (under 5 minutes)")
    p.add_argument("--out", default="results/bench")
    p.add_argument("--skip-loader", action="store_true")
    p.set_defaults(func=_bench)

    args = parser.parse_args(argv)
    try:
        return args.func(args, argv)
    except CliError as e:
        print(f"vlmkit {args.command}: error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError, TypeError, IndexError, RuntimeError) as e:
        print(f"vlmkit {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
