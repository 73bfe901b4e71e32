"""``vlmkit.Trainer``: the C++ training loop from Python.

The loop runs in C++ without the GIL (the Loader's workers decode in C++ too);
Python is called only for logging, evaluation and, in data-parallel runs, the
gradient all-reduce through ``torch.distributed``. Checkpoints are the format of
``vlmkit.checkpoint``.

The same loop trains any ``torch.nn.Module`` on batches from Python: give a
``loss(batch)`` function and, to ``fit``, a re-iterable of dicts of tensors (a
list, a ``torch.utils.data.DataLoader``) or a function ``epoch -> iterable``.
vlmkit's own recipes (Two-Tower, Two-Leg, the image encoder's stage 1) run on it.
"""
from __future__ import annotations

import math
import os
from typing import Any, Callable, Dict, Iterable, Mapping, Optional, Sequence

import torch

from . import _C


def _all_reduce_mean(grads: Sequence[torch.Tensor]) -> None:
    """Averages gradients over the default torch.distributed group (one flat buffer)."""
    import torch.distributed as dist
    world = dist.get_world_size()
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset:offset + n].view_as(g))
        offset += n


class Trainer:
    """Trains a vlmkit model, or any torch.nn.Module given a loss, with AdamW.

    Args:
        model: a vlmkit model, or any ``torch.nn.Module`` with ``loss``. Without
            ``loss`` a vlmkit model trains on its own: the generative architectures
            on the Loader's batches, Two-Tower on ``images``, ``input_ids`` (and
            ``padding_mask``), Two-Leg on those and ``labels``; a CLIP Two-Tower run
            whose loss sits at its chance value ln(batch) with one text embedding for
            every caption is reported as collapsed in one line. A plain module: the
            Trainer trains its parameters in place (names as ``named_parameters``,
            for ``freeze`` and ``group_lr``), and its checkpoints hold them and its
            buffers (``config.json`` is null).
        steps, lr, weight_decay, warmup_steps, min_lr_ratio, decay_fraction, clip_norm, accumulation:
            the optimisation (AdamW, linear warmup then cosine to ``lr * min_lr_ratio``
            over the last ``decay_fraction`` of the steps, holding ``lr`` before it
            (1.0, the default: cosine over the whole run; 0.2: warmup-stable-decay),
            global-norm clipping, batches per step).
        group_lr: learning rates per component, e.g. ``{"image_encoder": 1e-4}``.
        freeze: components to freeze, e.g. ``["image_encoder", "decoder"]`` (LLaVA stage 1).
        beta1, beta2, eps: AdamW's (or ``betas=(beta1, beta2)`` as torch.optim spells them).
        log_every, eval_every, checkpoint_every, keep_checkpoints, output_dir: bookkeeping;
            ``output_dir`` receives ``metrics.jsonl`` and ``checkpoints/``.
        loss: optional ``f(batch_dict) -> scalar tensor``.
        precision: ``"fp32"`` or ``"bf16"`` (forward and loss under bfloat16 autocast;
            float32 weights, gradients and AdamW state). On CPU, bf16 matrix products
            run on torch's threads: ``vlmkit.set_num_threads(2, 1)`` on two cores.
        distributed: average gradients over ``torch.distributed`` (default: when it is
            initialised with more than one process); only rank 0 writes files.
    """

    def __init__(self, model: torch.nn.Module, *,
                 loss: Optional[Callable[[Dict[str, torch.Tensor]], torch.Tensor]] = None,
                 distributed: Optional[bool] = None, betas: Optional[Sequence[float]] = None,
                 **options: Any) -> None:
        # The options are C++'s TrainerOptions (one field list: _C.Trainer.defaults);
        # the signature below is generated from it.
        unknown = sorted(set(options) - set(_OPTIONS) | ({"rank"} & set(options)))
        if unknown:
            raise TypeError(f"Trainer: unexpected option(s) {', '.join(map(repr, unknown))}; the options are "
                            f"{', '.join(k for k in _OPTIONS if k != 'rank')} (rank comes from torch.distributed)")
        #: The CollapseMonitor watching a CLIP Two-Tower model's own loss (else None).
        self.collapse_monitor = None
        if hasattr(model, "cpp_module"):
            module = model.cpp_module
            if loss is None:
                loss, self.collapse_monitor = _own_loss(model, options.get("warmup_steps", _OPTIONS["warmup_steps"]),
                                                        options.get("accumulation", _OPTIONS["accumulation"]))
        elif isinstance(model, torch.nn.Module):
            if loss is None:
                raise TypeError(f"Trainer: a plain torch.nn.Module ({type(model).__name__}) has no built-in loss; "
                                "give loss=f(batch) -> scalar tensor")
            module = _C.tensor_module(list(model.named_parameters()), list(model.named_buffers()))
        else:
            raise TypeError(f"Trainer: expected a vlmkit model or a torch.nn.Module, got {type(model).__name__}")
        import torch.distributed as dist
        active = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        self.distributed = active if distributed is None else bool(distributed)
        if self.distributed and not active:
            raise ValueError("Trainer: distributed=True needs torch.distributed initialised with world size > 1")
        self.rank = dist.get_rank() if self.distributed else 0
        self.model = model
        if betas is not None:  # torch.optim's spelling of beta1, beta2
            if "beta1" in options or "beta2" in options:
                raise TypeError("Trainer: give betas or beta1/beta2, not both")
            options["beta1"], options["beta2"] = betas
        if options.get("group_lr") is None:
            options.pop("group_lr", None)
        if "freeze" in options and not isinstance(options["freeze"], (list, tuple)):
            options["freeze"] = list(options["freeze"])
        if "output_dir" in options:
            options["output_dir"] = os.fspath(options["output_dir"])
        options["rank"] = self.rank
        self._trainer = _C.Trainer(module, options, loss)

    @property
    def state(self) -> Dict[str, Any]:
        """step, epoch, batch_in_epoch, samples, nonfinite_steps, last_loss."""
        return self._trainer.state

    @property
    def options(self) -> Dict[str, Any]:
        return self._trainer.options

    @property
    def trainable(self):
        """Names of the parameters being trained (frozen ones left out)."""
        return self._trainer.trainable

    def schedule(self, step: int) -> float:
        """Learning-rate multiplier at ``step``."""
        return self._trainer.schedule(step)

    def resume(self, path: Optional[str] = None) -> bool:
        """Restores model, optimizer, RNG and data position from ``path`` or, when None,
        from the latest checkpoint under ``output_dir``; False when there is none."""
        return self._trainer.resume(os.fspath(path) if path is not None else "")

    def save_checkpoint(self) -> str:
        return self._trainer.save_checkpoint()

    def fit(self, data, evaluate: Optional[Callable[[int], Mapping[str, float]]] = None,
            on_log: Optional[Callable[[Dict[str, Any]], None]] = None) -> Dict[str, Any]:
        """Trains until ``steps``. ``data``: a ``vlmkit.data.Loader``; or batches from
        Python, each a dict of tensors (``images``, ``input_ids``, ``labels``,
        ``padding_mask``, ... by the Loader's names, any other key passed through to
        ``loss``): a re-iterable (list, DataLoader; iterated again each epoch) or a
        function ``epoch -> iterable``. Exact resume needs the same batches for the
        same epoch. ``evaluate(step)`` returns metrics (every ``eval_every`` steps and at
        the end); ``on_log(record)`` replaces the progress line. Ctrl-C stops between
        steps (``save_checkpoint()`` then keeps the state). Returns the last loss, rates
        and evaluation."""
        source = _batch_source(data)
        if on_log is None:
            on_log = self._print if self.rank == 0 else (lambda record: None)
        self.model.train()
        if evaluate is not None:
            user_evaluate = evaluate

            def evaluate(step: int):
                try:
                    return user_evaluate(step)
                finally:
                    self.model.train()  # the C++ side sets its own modules only
        return self._trainer.fit(source, on_log, evaluate, _all_reduce_mean if self.distributed else None)

    @staticmethod
    def _print(record: Dict[str, Any]) -> None:
        if "eval" in record:
            print(f"eval at step {record['step']}: " + ", ".join(f"{k} {v:.3f}" for k, v in record["eval"].items()
                                                               if isinstance(v, (int, float))), flush=True)
            return
        eta = record["eta_seconds"]
        eta_text = f"{int(eta // 60)}m{int(eta % 60):02d}s" if math.isfinite(eta) else "?"
        # A step whose loss was not finite (skipped; the Trainer stops after a run of them) has no loss.
        loss = "not finite" if record.get("loss") is None else f"{record['loss']:.4f}"
        print(f"step {record['step']:6d}/{record['steps']}  loss {loss}  lr {record['lr']:.2e}  "
              f"{record['samples_per_second']:6.1f} samples/s  eta {eta_text}", flush=True)


def _own_loss(model: torch.nn.Module, warmup: int, accumulation: int):
    """(loss, monitor): the loss of a Two-Tower or Two-Leg model from a batch dict
    (None: the C++ Trainer's own generative loss), and the CollapseMonitor that
    watches a CLIP Two-Tower run (reporting in one line), else None."""
    from .metrics import CollapseMonitor
    from .models import TwoLeg, TwoTower
    if isinstance(model, TwoLeg):
        return lambda b: model(b["images"], b["input_ids"], b.get("padding_mask"), labels=b["labels"]).loss, None
    if not isinstance(model, TwoTower):
        return None, None
    # ln(batch) is the chance value of CLIP's InfoNCE; SigLIP's loss has no such fixed point.
    monitor = CollapseMonitor(after_step=warmup) if model.config["loss"] == "clip" else None
    calls = [0]

    def loss(b: Dict[str, torch.Tensor]) -> torch.Tensor:
        out = model(b["images"], b["input_ids"], b.get("padding_mask"))
        calls[0] += 1
        if monitor is not None and len(b["images"]) > 1:
            message = monitor.update(calls[0] // max(1, accumulation), out.loss.item(), out.text_embeds.detach(),
                                     len(b["images"]))
            if message:
                print(message, flush=True)
        return out.loss
    return loss, monitor


def _batch_source(data) -> "_C.BatchSource":
    """The C++ source of Trainer.fit's ``data`` (see there); anything else is refused."""
    source = getattr(data, "_loader", data)
    if isinstance(source, _C.BatchSource):
        return source
    if isinstance(data, (str, bytes, Mapping)) or not (callable(data) or hasattr(data, "__iter__")):
        raise TypeError(f"Trainer.fit: expected a vlmkit.data.Loader, a re-iterable of batch dicts or a function "
                        f"epoch -> iterable, got {type(data).__name__}")
    if callable(data):
        return _C.IterableBatchSource(data, -1)
    if iter(data) is data:  # an iterator is spent after one epoch
        raise TypeError(f"Trainer.fit: {type(data).__name__} is a one-pass iterator; give a re-iterable (a list, a "
                        "DataLoader) or a function epoch -> iterable of batches")
    return _C.IterableBatchSource(lambda epoch: data, len(data) if hasattr(data, "__len__") else -1)


class FusedAdamW:
    """AdamW (decoupled weight decay) whose step updates each float32 CPU parameter
    and its two moments in one fused C++ pass, the GIL released: the Trainer's
    optimizer, for your own loop. The same arithmetic as ``torch.optim.AdamW``
    (``foreach=False``) up to float rounding; other dtypes and devices (CUDA) take
    AdamW's sequence through torch's multi-tensor (foreach) kernels. One parameter group; ``lr`` may be set between steps (a
    schedule). ``zero_grad(set_to_none=True)`` as torch's."""

    def __init__(self, params: Iterable[torch.Tensor], lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2) -> None:
        self.params = [p for p in params if p.requires_grad]
        self._optimizer = _C.FusedAdamW(self.params, lr, betas[0], betas[1], eps, weight_decay)

    @property
    def lr(self) -> float:
        return self._optimizer.lr

    @lr.setter
    def lr(self, value: float) -> None:
        self._optimizer.lr = value

    @torch.no_grad()
    def step(self) -> None:
        self._optimizer.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            if p.grad is None:
                continue
            if set_to_none:
                p.grad = None
            else:
                p.grad.zero_()


#: Every Trainer option with its default, from C++ (TrainerOptions' field list).
_OPTIONS: Dict[str, Any] = _C.Trainer.defaults


def _signature() -> "inspect.Signature":
    import inspect
    params = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD),
              inspect.Parameter("model", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    keyword = inspect.Parameter.KEYWORD_ONLY
    params += [inspect.Parameter(k, keyword, default=v) for k, v in _OPTIONS.items() if k != "rank"]
    params += [inspect.Parameter("betas", keyword, default=None), inspect.Parameter("loss", keyword, default=None),
               inspect.Parameter("distributed", keyword, default=None)]
    return inspect.Signature(params)


Trainer.__init__.__signature__ = _signature()
Trainer.__doc__ += ("\n    Options and defaults (C++ TrainerOptions): "
                    + ", ".join(f"{k}={v!r}" for k, v in _OPTIONS.items() if k != "rank") + ".\n")
