"""The torch.nn.Module face of the C++ modules.

The extension binds each C++ module as a plain pybind class (``vlmkit._C.ViT``)
exposing its parameters and buffers by dotted name. :class:`CppModule` wraps
one in a real ``torch.nn.Module``: to Python it is a leaf module whose
``_parameters`` are a live view of every C++ parameter (``image_encoder.norm.weight``),
so ``parameters()``, ``named_parameters()``, ``torch.optim``, ``.to()``,
``.train()/.eval()``, hooks, ``nn.Sequential`` and ``DistributedDataParallel``
work through torch's own code, on LibTorch 1.x and 2.x alike (torch 2.x no
longer ships ``torch.nn.cpp.ModuleWrapper``). ``state_dict()`` and
``load_state_dict()`` are implemented here for the dotted names.
"""
from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Mapping as _MappingABC
from typing import Any, Callable, Dict, Iterator, Mapping

import torch
from torch.nn.modules.module import _IncompatibleKeys


class _TensorView(_MappingABC):
    """Read-only live mapping over a C++ module's named parameters or buffers."""

    def __init__(self, getter: Callable[[], Dict[str, torch.Tensor]]) -> None:
        self._get = getter

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._get()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._get())

    def __len__(self) -> int:
        return len(self._get())

    def __contains__(self, key: object) -> bool:
        return key in self._get()


class CppModule(torch.nn.Module):
    """A ``torch.nn.Module`` backed by a bound C++ module (``self.cpp_module``).

    Subclasses set ``_cpp_class``; constructor arguments go to it.
    """

    _cpp_class: Any = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if self._cpp_class is None:
            raise TypeError(f"{type(self).__name__} has no C++ class to construct")
        self._wrap(self._cpp_class(*args, **kwargs))

    def _wrap(self, cpp: Any) -> None:
        object.__setattr__(self, "cpp_module", cpp)
        super().__init__()
        object.__setattr__(self, "_parameters", _TensorView(lambda: cpp.named_parameters(True)))
        object.__setattr__(self, "_buffers", _TensorView(lambda: cpp.named_buffers(True)))

    @classmethod
    def from_cpp(cls, cpp: Any) -> "CppModule":
        """Wraps an existing C++ module object (for example a child of a model)."""
        module = cls.__new__(cls)
        module._wrap(cpp)
        return module

    # -- delegation -------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.cpp_module.forward(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            pass
        cpp = self.__dict__.get("cpp_module")
        if cpp is None:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        children = cpp.named_children()
        if name in children:
            return children[name]
        return getattr(cpp, name)

    @property
    def training(self) -> bool:  # type: ignore[override]
        cpp = self.__dict__.get("cpp_module")
        return cpp.training if cpp is not None else True

    @training.setter
    def training(self, mode: bool) -> None:
        self.cpp_module.train(bool(mode))

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], *args: Any, **kwargs: Any) -> "CppModule":
        # The tensors belong to C++: convert them in place (as torch.nn.cpp did).
        with torch.no_grad():
            for param in self.parameters():
                param.data = fn(param.data)
                if param.grad is not None:
                    param.grad.data = fn(param.grad.data)
            for buffer in self.buffers():
                buffer.data = fn(buffer.data)
        return self

    # -- state dict ---------------------------------------------------------------
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

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True,
                        assign: bool = False) -> _IncompatibleKeys:
        """Copies tensors in place; raises like torch on missing/unexpected keys and size mismatches."""
        if not isinstance(state_dict, _MappingABC):
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

    # -- presentation ---------------------------------------------------------------
    def __repr__(self) -> str:
        cpp = self.__dict__.get("cpp_module")
        return cpp._tree_repr() if cpp is not None else f"<{type(self).__name__} (not constructed)>"

    @property
    def config(self) -> Dict[str, Any]:
        """The complete config that rebuilds this module (every default filled in)."""
        if hasattr(self.cpp_module, "config_json"):
            return json.loads(self.cpp_module.config_json())
        return dict(self.cpp_module.options)

    def __reduce__(self):
        raise TypeError(f"{type(self).__name__} is backed by C++ and cannot be pickled; "
                        f"save model.config and model.state_dict() instead")


def wrap_block(cpp_class: type, name: str, doc: str | None = None) -> type:
    """The public torch.nn.Module class for a bound C++ block."""
    return type(name, (CppModule,), {"_cpp_class": cpp_class, "__module__": "vlmkit",
                                     "__doc__": doc or cpp_class.__doc__})


def _slot_init(make: Callable[..., Any], name: str, positional: tuple) -> Callable[..., None]:
    def __init__(self: CppModule, *args: Any, **options: Any) -> None:
        if len(args) != len(positional):
            raise TypeError(f"{type(self).__name__}() takes {len(positional)} positional arguments "
                            f"({', '.join(positional)}), got {len(args)}")
        self._wrap(make(name, *args, json.dumps(options)))
    return __init__


def slot_classes(rows: list, make: Callable[..., Any], positional: tuple) -> Dict[str, type]:
    """One ``torch.nn.Module`` class per row of a C++ slot registry (``_C.projector_types()``),
    named and documented from the row: ``Cls(*positional, **options)`` calls ``make``."""
    out: Dict[str, type] = {}
    for row in rows:
        fields = ", ".join(f"{key}={value!r}" for key, value in row["defaults"].items())
        signature = f"{row['python_class']}({', '.join(positional)}{', ' + fields if fields else ''})"
        out[row["python_class"]] = type(row["python_class"], (CppModule,), {
            "__init__": _slot_init(make, row["name"], positional), "__module__": "vlmkit",
            "type_name": row["name"],
            "__doc__": f"{row['doc']}.\n\n{signature}; config type '{row['name']}'."})
    return out
