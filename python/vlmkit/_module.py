"""The torch.nn.Module face of the C++ modules.

The extension binds each C++ module as a plain pybind class (``vlmkit._C.ViT``).
:class:`CppModule` wraps one in a real ``torch.nn.Module`` tree: its
``_parameters`` and ``_buffers`` are live views of the module's own C++ tensors,
and its ``_modules`` a live view of its C++ children, each wrapped in a
CppModule too (``model.image_encoder``, ``model.decoder.blocks[0]``). So
``parameters()`` and ``named_parameters()`` (dotted names, as in C++:
``image_encoder.norm.weight``), ``named_modules()``, ``apply()``,
``requires_grad_()`` per module, ``torch.optim``, ``.to()``, ``.train()/.eval()``,
``nn.Sequential`` and ``DistributedDataParallel`` work through torch's own code,
on LibTorch 1.x and 2.x alike (torch 2.x no longer ships
``torch.nn.cpp.ModuleWrapper``). Forward hooks fire when a module is called from
Python; a parent's forward runs in C++ and does not call its children's hooks.
``state_dict()`` and ``load_state_dict()`` are implemented here for the dotted
names.
"""
from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Mapping as _MappingABC
from typing import Any, Callable, Dict, Iterator, Mapping

import torch
from torch.nn.modules.module import _IncompatibleKeys

from . import _C


class _TensorView(_MappingABC):
    """Read-only live mapping over a C++ module's named parameters or buffers (or,
    in _ChildView, its children)."""

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

    # One C++ call per traversal (torch iterates items() of every module).
    def items(self):  # type: ignore[override]
        return self._get().items()

    def values(self):  # type: ignore[override]
        return self._get().values()

    def keys(self):  # type: ignore[override]
        return self._get().keys()


class _ChildView(_TensorView):
    """Read-only live mapping of a C++ module's children to their CppModule wrappers
    (one wrapper per child object, kept while the child is the same C++ module)."""

    def __init__(self, cpp: Any) -> None:
        super().__init__(self._children)
        self._cpp = cpp
        self._wrappers: Dict[str, tuple] = {}

    def _children(self) -> Dict[str, "CppModule"]:
        out = OrderedDict()
        for name, child in _C._module_children(self._cpp).items():
            address = _C._module_address(child)
            cached = self._wrappers.get(name)
            if cached is None or cached[0] != address:
                cached = (address, wrapper_class(_C._module_name(child)).from_cpp(child))
                self._wrappers[name] = cached
            out[name] = cached[1]
        return out


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
        object.__setattr__(self, "_wrapping", True)
        super().__init__()
        del self.__dict__["_wrapping"]
        object.__setattr__(self, "_parameters", _TensorView(lambda: _C._module_parameters(cpp, False)))
        object.__setattr__(self, "_buffers", _TensorView(lambda: _C._module_buffers(cpp, False)))
        object.__setattr__(self, "_modules", _ChildView(cpp))

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
            return super().__getattr__(name)  # parameters, buffers and children (wrapped)
        except AttributeError:
            pass
        cpp = self.__dict__.get("cpp_module")
        if cpp is None:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        return getattr(cpp, name)

    @property
    def training(self) -> bool:  # type: ignore[override]
        cpp = self.__dict__.get("cpp_module")
        return _C._module_training(cpp) if cpp is not None else True

    @training.setter
    def training(self, mode: bool) -> None:
        if self.__dict__.get("_wrapping"):  # nn.Module.__init__'s default: keep the C++ module's mode
            return
        _C._module_train(self.cpp_module, bool(mode))

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
        return _C._module_repr(cpp) if cpp is not None else f"<{type(self).__name__} (not constructed)>"

    @property
    def config(self) -> Dict[str, Any]:
        """The complete config that rebuilds this module (every default filled in)."""
        if hasattr(self.cpp_module, "config_json"):
            return json.loads(self.cpp_module.config_json())
        return dict(self.cpp_module.options)

    def __reduce__(self):
        raise TypeError(f"{type(self).__name__} is backed by C++ and cannot be pickled; "
                        f"save model.config and model.state_dict() instead")


_WRAPPERS: Dict[str, type] = {}


def wrapper_class(cpp_name: str) -> type:
    """The CppModule class for a C++ module named ``cpp_name`` ("vlmkit::ViT"): the
    public vlmkit class of that name when there is one, else a plain CppModule
    subclass of that name (``ModuleList``, ``MultiheadAttention``, ...)."""
    short = cpp_name.rsplit("::", 1)[-1]
    short = short[:-4] if short.endswith("Impl") else short
    if cpp_name not in _WRAPPERS:
        import vlmkit
        public = getattr(vlmkit, short, None)
        if isinstance(public, type) and issubclass(public, CppModule):
            _WRAPPERS[cpp_name] = public
        else:
            body = {"__module__": "vlmkit", "__doc__": f"The C++ module {cpp_name}."}
            if short in ("ModuleList", "Sequential"):
                body.update(_LIST_METHODS)
            _WRAPPERS[cpp_name] = type(short, (CppModule,), body)
    return _WRAPPERS[cpp_name]


def _list_getitem(self: CppModule, index: int) -> CppModule:
    if not isinstance(index, int):
        raise TypeError(f"{type(self).__name__} indices must be integers, got {type(index).__name__}")
    return list(self._modules.values())[index]


#: A ModuleList child (``model.decoder.blocks``) indexes, iterates and counts like torch's.
_LIST_METHODS = {"__getitem__": _list_getitem, "__len__": lambda self: len(self._modules),
                 "__iter__": lambda self: iter(list(self._modules.values()))}


def wrap_block(cpp_class: type, name: str, doc: str | None = None) -> type:
    """The public torch.nn.Module class for a bound C++ block."""
    return type(name, (CppModule,), {"_cpp_class": cpp_class, "__module__": "vlmkit",
                                     "__doc__": doc or cpp_class.__doc__})


def _slot_init(make: Callable[..., Any], name: str, positional: tuple, fields: tuple) -> Callable[..., None]:
    def __init__(self: CppModule, *args: Any, **options: Any) -> None:
        # The widths, then the row's option fields in their order (keywords too).
        if not len(positional) <= len(args) <= len(positional) + len(fields):
            raise TypeError(f"{type(self).__name__}() takes {len(positional)} to {len(positional) + len(fields)} "
                            f"positional arguments ({', '.join(positional + fields)}), got {len(args)}")
        for field, value in zip(fields, args[len(positional):]):
            if field in options:
                raise TypeError(f"{type(self).__name__}() got multiple values for argument {field!r}")
            options[field] = value
        self._wrap(make(name, *args[:len(positional)], json.dumps(options)))
    return __init__


def slot_classes(rows: list, make: Callable[..., Any], positional: tuple) -> Dict[str, type]:
    """One ``torch.nn.Module`` class per row of a C++ slot registry (``_C.projector_types()``),
    named and documented from the row: ``Cls(*positional, **options)`` calls ``make``."""
    out: Dict[str, type] = {}
    for row in rows:
        fields = ", ".join(f"{key}={row['defaults'][key]!r}" for key in row["fields"])
        signature = f"{row['python_class']}({', '.join(positional)}{', ' + fields if fields else ''})"
        out[row["python_class"]] = type(row["python_class"], (CppModule,), {
            "__init__": _slot_init(make, row["name"], positional, tuple(row["fields"])), "__module__": "vlmkit",
            "type_name": row["name"],
            "__doc__": f"{row['doc']}.\n\n{signature}; config type '{row['name']}'."})
    return out
