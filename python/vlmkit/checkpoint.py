"""Checkpoints shared by Python and C++.

A checkpoint is a directory (see ``include/vlmkit/train/checkpoint.h``)::

    step-00000600/config.json            the model config (``build_model`` reads it)
                  model.safetensors      weights by dotted name
                  optimizer.safetensors  AdamW moments and step per parameter, RNG state
                  trainer.json           step, data position, options, metrics
                  adapter_config.json    LoRA adapters the weights include (vlmkit.lora)
                  SHA256SUMS             verified when read (``sha256sum -c`` works too)

It is written to a temporary directory, fsynced and renamed; ``latest`` names
the newest complete one, so killing a run at any moment leaves a loadable
checkpoint. Weights are safetensors: loading never executes code from the file.
The C++ ``vlmkit::Trainer`` and ``vlmkit::load_model`` read and write the same
format, so a checkpoint written here resumes or runs in C++ and the other way round.

For a plain ``torch.optim.AdamW`` loop in a notebook::

    path = vlmkit.checkpoint.save("runs/mine", model, optimizer, step=step)
    info = vlmkit.checkpoint.load("runs/mine", model, optimizer)   # info["step"]
"""
from __future__ import annotations

import os
from typing import Any, Dict, Mapping, Optional, Tuple

import torch

from . import _C

CheckpointNotFound = _C.CheckpointNotFound
Checkpoint = _C.Checkpoint
save_safetensors = _C.save_safetensors
load_safetensors = _C.load_safetensors
latest = _C.latest_checkpoint


def _root(directory: str) -> str:
    directory = os.fspath(directory)
    return directory if os.path.basename(os.path.normpath(directory)) == "checkpoints" else \
        os.path.join(directory, "checkpoints")


def _optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> Dict[str, torch.Tensor]:
    names = {id(p): n for n, p in model.named_parameters()}
    out: Dict[str, torch.Tensor] = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p)
            if not state or "exp_avg" not in state:
                continue
            if id(p) not in names:
                raise ValueError("optimizer holds a parameter that is not in the model")
            name = names[id(p)]
            step = state["step"]
            out[f"{name}.exp_avg"] = state["exp_avg"]
            out[f"{name}.exp_avg_sq"] = state["exp_avg_sq"]
            out[f"{name}.step"] = torch.tensor(int(step.item() if torch.is_tensor(step) else step))
    return out


def save(directory: str, model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer] = None, *,
         step: int = 0, epoch: int = 0, batch_in_epoch: int = 0, samples: int = 0,
         extra: Optional[Mapping[str, Any]] = None, keep: int = 2) -> str:
    """Writes ``directory/checkpoints/step-XXXXXXXX`` atomically and returns its path.

    ``optimizer``: a ``torch.optim.AdamW`` (or Adam) over ``model``'s parameters;
    its moments are stored by parameter name. ``epoch``/``batch_in_epoch`` record the
    data position (``Loader.start_epoch(epoch, batch_in_epoch)`` resumes there).
    The torch CPU RNG state is saved too. The newest ``keep`` checkpoints are kept.
    """
    if not hasattr(model, "cpp_module"):
        raise TypeError(f"save: expected a vlmkit model, got {type(model).__name__}")
    root = _root(directory)
    writer = _C.CheckpointWriter(root, f"step-{int(step):08d}")
    writer.add_json("config.json", model.config)
    if _C.lora_merged(model.cpp_module):
        raise ValueError("save: the model's LoRA adapters are merged into its weights; vlmkit.lora.unmerge "
                         "first, or vlmkit.lora.remove(model) to save plain weights")
    if _C.lora_layers(model.cpp_module):
        writer.add_json("adapter_config.json", _C.lora_config(model.cpp_module))
    writer.add_tensors("model.safetensors", {k: v.detach() for k, v in model.state_dict().items()}, {"format": "pt"})
    opt = _optimizer_state(model, optimizer) if optimizer is not None else {}
    opt["rng.torch_cpu"] = torch.get_rng_state()
    writer.add_tensors("optimizer.safetensors", opt, {"format": "vlmkit-adamw"})
    record = {"format": "vlmkit-checkpoint", "version": 1, "step": int(step), "epoch": int(epoch),
              "batch_in_epoch": int(batch_in_epoch), "samples": int(samples),
              "writer": f"vlmkit {_C.__version__} (Python)", "torch_version": torch.__version__}
    if optimizer is not None:
        record["optimizer"] = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    record.update(dict(extra or {}))
    writer.add_json("trainer.json", record)
    path = writer.commit()
    _C.prune_checkpoints(root, keep)
    return path


def load(path: str, model: Optional[torch.nn.Module] = None,
         optimizer: Optional[torch.optim.Optimizer] = None, *, restore_rng: bool = True) -> Dict[str, Any]:
    """Loads a checkpoint (a checkpoint directory or a run folder: its latest).

    Fills ``model`` (strict: names and shapes must match) and ``optimizer`` when
    given, restores the RNG, and returns trainer.json plus ``path`` and, when
    ``model`` was None, the built ``model``. Raises FileNotFoundError when there is
    no checkpoint, ValueError when a checksum or the format is wrong.
    """
    checkpoint = _C.Checkpoint(os.fspath(path))
    info: Dict[str, Any] = checkpoint.read_json("trainer.json") if checkpoint.has("trainer.json") else {}
    info["path"] = checkpoint.path
    if model is None:
        from .models import build_model
        model = build_model(checkpoint.read_json("config.json"))
        info["model"] = model
    if not hasattr(model, "cpp_module"):
        raise TypeError(f"load: expected a vlmkit model, got {type(model).__name__}")
    if checkpoint.has("adapter_config.json") and not _C.lora_layers(model.cpp_module):
        _C.lora_apply_config(model.cpp_module, checkpoint.read_json("adapter_config.json"))
    weights, _ = checkpoint.read_tensors("model.safetensors")
    _C.load_module_state(model.cpp_module, weights, checkpoint.path)
    if checkpoint.has("optimizer.safetensors") and (optimizer is not None or restore_rng):
        state, _ = checkpoint.read_tensors("optimizer.safetensors")
        if optimizer is not None:
            params = dict(model.named_parameters())
            for name, p in params.items():
                if f"{name}.exp_avg" not in state:
                    continue
                m, v = state[f"{name}.exp_avg"], state[f"{name}.exp_avg_sq"]
                if m.shape != p.shape:
                    raise ValueError(f"{checkpoint.path}: optimizer state of {name} has shape {tuple(m.shape)}, "
                                     f"the parameter {tuple(p.shape)}")
                optimizer.state[p] = {"step": torch.tensor(float(state[f"{name}.step"].item())),
                                      "exp_avg": m.to(p), "exp_avg_sq": v.to(p)}
        if restore_rng and "rng.torch_cpu" in state:
            torch.set_rng_state(state["rng.torch_cpu"])
    return info


def save_model(directory: str, model: torch.nn.Module, name: str = "model") -> str:
    """Config + weights only (``directory/name``), for inference and sharing."""
    if not hasattr(model, "cpp_module"):
        raise TypeError(f"save_model: expected a vlmkit model, got {type(model).__name__}")
    return _C.save_model(os.fspath(directory), model.cpp_module, name)


def load_model(path: str) -> torch.nn.Module:
    """Builds the model a checkpoint describes and loads its weights."""
    return load(path, restore_rng=False)["model"]
