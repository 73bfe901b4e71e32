"""Python side of the C++ modules: the gaps of ``torch.nn.cpp.ModuleWrapper``.

``torch::python::bind_module`` makes every vlmkit block a ``torch.nn.Module``
subclass, but the wrapper copies the C++ methods onto each instance, so a few
``nn.Module`` methods come back with C++ signatures (``to("cpu")`` fails,
``train()`` returns None) and ``state_dict()`` fails for modules with
children. :class:`CppModule` restores the ``torch.nn.Module`` behaviour.
"""
from __future__ import annotations

import json
from collections import OrderedDict
from typing import Any, Dict, Iterator, Mapping, Tuple

import torch
from torch.nn.modules.module import _IncompatibleKeys

# Instance attributes copied from C++ that nn.Module implements better: they
# are removed so the class-level (nn.Module or mixin) versions apply.
_TORCH_SIDE = (
    "to", "cuda", "cpu", "float", "double", "half", "zero_grad", "train", "eval",
    "named_parameters", "named_buffers",
)


class CppModule:
    """Mixin placed before the bound class: ``class ViT(CppModule, _C.ViT)``."""

    def _finish_init(self) -> None:
        for name in _TORCH_SIDE:
            self.__dict__.pop(name, None)

    # -- iteration with torch's signatures ---------------------------------
    def named_parameters(self, prefix: str = "", recurse: bool = True,
                         remove_duplicate: bool = True) -> Iterator[Tuple[str, torch.Tensor]]:
        for name, tensor in self.cpp_module.named_parameters(recurse).items():
            yield prefix + ("." if prefix else "") + name, tensor

    def named_buffers(self, prefix: str = "", recurse: bool = True,
                      remove_duplicate: bool = True) -> Iterator[Tuple[str, torch.Tensor]]:
        for name, tensor in self.cpp_module.named_buffers(recurse).items():
            yield prefix + ("." if prefix else "") + name, tensor

    # -- state dict ----------------------------------------------------------
    def state_dict(self, *args: Any, destination: Dict[str, torch.Tensor] | None = None,
                   prefix: str = "", keep_vars: bool = False) -> Dict[str, torch.Tensor]:
        """Parameters and buffers by their dotted C++ names (``image_encoder.norm.weight``)."""
        if args:  # torch's deprecated positional form: (destination, prefix, keep_vars)
            destination = args[0]
            prefix = args[1] if len(args) > 1 else prefix
            keep_vars = args[2] if len(args) > 2 else keep_vars
        out = OrderedDict() if destination is None else destination
        for name, tensor in self.named_parameters():
            out[prefix + name] = tensor if keep_vars else tensor.detach()
        for name, tensor in self.named_buffers():
            out[prefix + name] = tensor if keep_vars else tensor.detach()
        return out

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True) -> _IncompatibleKeys:
        """Copies tensors in place; raises like torch on missing/unexpected keys and size mismatches."""
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"expected state_dict to be a mapping of names to tensors, "
                            f"got {type(state_dict).__name__}")
        own = self.state_dict(keep_vars=True)
        missing = [k for k in own if k not in state_dict]
        unexpected = [k for k in state_dict if k not in own]
        errors = []
        for key, target in own.items():
            if key not in state_dict:
                continue
            source = state_dict[key]
            if not isinstance(source, torch.Tensor):
                errors.append(f"'{key}': expected a tensor, got {type(source).__name__}")
            elif source.shape != target.shape:
                errors.append(f"size mismatch for '{key}': expected {tuple(target.shape)}, "
                              f"got {tuple(source.shape)}")
        if strict:
            if missing:
                errors.insert(0, "Missing key(s): " + ", ".join(repr(k) for k in missing))
            if unexpected:
                errors.insert(0, "Unexpected key(s): " + ", ".join(repr(k) for k in unexpected))
        if errors:
            raise RuntimeError(f"Error(s) in loading state_dict for {type(self).__name__}:\n\t"
                               + "\n\t".join(errors))
        with torch.no_grad():
            for key, target in own.items():
                if key in state_dict:
                    target.copy_(state_dict[key])
        return _IncompatibleKeys(missing, unexpected)

    # -- presentation ----------------------------------------------------------
    def __repr__(self) -> str:
        cpp = self.__dict__.get("cpp_module")
        return cpp._tree_repr() if cpp is not None else f"<{type(self).__name__} (not constructed)>"

    @property
    def config(self) -> Dict[str, Any]:
        """The complete config that rebuilds this module (every default filled in)."""
        if hasattr(self.cpp_module, "config_json"):
            return json.loads(self.cpp_module.config_json())
        return dict(self.cpp_module.options)


def wrap_block(base: type, name: str, doc: str | None = None) -> type:
    """A public class for a bound block: ``CppModule`` + the C++ wrapper."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        base.__init__(self, *args, **kwargs)
        self._finish_init()

    return type(name, (CppModule, base), {
        "__init__": __init__,
        "__module__": "vlmkit",
        "__doc__": doc or base.__doc__,
    })
