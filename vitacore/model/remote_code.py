"""Models whose code lives in their folder (``config.json``'s ``auto_map``), loaded as released.

InternViT-300M-448px (VITA-1.5's tower) is such a folder, and its files trip transformers 5 twice:

1. ``modeling_intern_vit.py`` imports ``timm`` at module level, only for ``DropPath``. transformers
   refuses to import the file when ``timm`` is not installed, and installing it pulls torchvision
   and a CUDA torch onto CPU machines. So where ``timm`` is not importable, :func:`timm_standin`
   puts a minimal ``timm`` (``timm.layers`` / ``timm.models.layers`` with :class:`DropPath`, timm's
   semantics) into ``sys.modules`` for the import only, and takes it out again; an installed
   ``timm`` is never shadowed, and the files on disk are never changed.
2. ``InternVisionModel.__init__`` never calls ``self.post_init()``, so ``from_pretrained`` fails on
   the missing ``all_tied_weights_keys``. So remote-code models are not loaded through
   ``from_pretrained``: :func:`build_remote_model` builds the class from its config (partitioned
   under a live ZeRO-3 config, as transformers builds models), completes the post-init state where
   the class skipped it (``post_init()``, so the object behaves like any transformers model
   afterwards; its random init is wasted work, overwritten next), and :func:`load_remote_weights`
   loads the folder's weights strictly: every key present, none unexpected, every shape equal, each
   error naming the folder and the key. Under ZeRO-3 each module's parameters are gathered with
   ``modifier_rank=0`` and filled from rank 0's copy. One path for every remote-code model keeps the
   behaviour the same whether or not a folder's code calls ``post_init``.

Running a folder's code is a trust decision (``--trust_remote_code``, default False): every entry
point takes ``trust_remote_code`` and, without it, refuses before anything of the folder is imported,
naming the ``.py`` files that would run (:func:`require_trust`, :func:`remote_code_files`).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import sys
import types
from typing import Iterator, Optional

import torch
import torch.nn as nn

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_FILE = "pytorch_model.bin"
TORCH_INDEX = "pytorch_model.bin.index.json"


def drop_path(x: torch.Tensor, drop_prob: float = 0.0, training: bool = False,
              scale_by_keep: bool = True) -> torch.Tensor:
    """Stochastic depth: zero whole samples of a residual branch with probability ``drop_prob``.

    Each sample (first dimension) is kept with probability ``1 - drop_prob``; kept samples are
    divided by that probability when ``scale_by_keep``, so the expected value is unchanged. The
    identity outside training or with ``drop_prob`` 0 (timm's ``drop_path``).
    """
    if drop_prob == 0.0 or not training:
        return x
    keep = 1.0 - drop_prob
    mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
    if keep > 0.0 and scale_by_keep:
        mask.div_(keep)
    return x * mask


class DropPath(nn.Module):
    """:func:`drop_path` as a module, with ``timm.layers.DropPath``'s constructor.

    Args:
        drop_prob: probability of dropping a sample's branch while training.
        scale_by_keep: scale kept samples by ``1 / (1 - drop_prob)``.
    """

    def __init__(self, drop_prob: float = 0.0, scale_by_keep: bool = True):
        super().__init__()
        self.drop_prob = drop_prob
        self.scale_by_keep = scale_by_keep

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.drop_prob, self.training, self.scale_by_keep)

    def extra_repr(self) -> str:
        return f"drop_prob={round(self.drop_prob, 3):0.3f}"


def timm_importable() -> bool:
    """Whether a real ``timm`` is imported or installed."""
    return "timm" in sys.modules or importlib.util.find_spec("timm") is not None


@contextlib.contextmanager
def timm_standin() -> Iterator[bool]:
    """While active, ``from timm.models.layers import DropPath`` (or ``timm.layers``) gives
    :class:`DropPath` when ``timm`` is not installed; the stand-in modules leave ``sys.modules`` on exit.

    Yields:
        True when the stand-in is in place, False when a real ``timm`` is used.
    """
    if timm_importable():
        yield False
        return
    root, models, layers = (types.ModuleType(name) for name in ("timm", "timm.models", "timm.layers"))
    for module in (root, models, layers):
        module.__doc__ = "vitacore's stand-in for timm (only DropPath), present while remote code imports"
    root.__path__, models.__path__ = [], []  # packages, so their submodules resolve from sys.modules
    layers.DropPath, layers.drop_path = DropPath, drop_path
    root.models, root.layers, models.layers = models, layers, layers
    standin = {"timm": root, "timm.models": models, "timm.layers": layers, "timm.models.layers": layers}
    sys.modules.update(standin)
    try:
        yield True
    finally:
        for name, module in standin.items():
            if sys.modules.get(name) is module:
                del sys.modules[name]


class RemoteCodeError(RuntimeError):
    """A folder's own code failed while it was imported or built its model (the cause is chained)."""


@contextlib.contextmanager
def folder_code(what: str):
    """Report any failure of a folder's code inside as :class:`RemoteCodeError` naming ``what`` ran and
    the original error; missing packages stay ``ImportError`` (their message says what to install)."""
    try:
        yield
    except (RemoteCodeError, ImportError):
        raise
    except Exception as err:
        raise RemoteCodeError(f"{what} raised {type(err).__name__}: {err}") from err


def _auto_map_modules(auto_map: dict) -> list[str]:
    """Modules ``auto_map`` names (entries ``"module.Class"``, ``"repo--module.Class"``, ``[slow, fast]``)."""
    modules = []
    for value in auto_map.values():
        for entry in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(entry, str) and "." in entry:
                modules.append(entry.split("--")[-1].rsplit(".", 1)[0])
    return modules


def remote_code_files(path: str) -> list[str]:
    """The Python files (relative to ``path``) that loading ``path`` runs: the modules its config.json's
    ``auto_map`` names and, recursively, the files they import relatively. Files are read as text; nothing
    is imported.

    Returns:
        Sorted file names; empty when config.json has no ``auto_map`` or cannot be read.
    """
    from transformers.dynamic_module_utils import get_relative_import_files

    try:
        with open(os.path.join(path, CONFIG_FILE)) as fh:
            auto_map = json.load(fh).get("auto_map")
    except (OSError, ValueError, AttributeError):
        return []
    if not isinstance(auto_map, dict):
        return []
    files = set()
    for module in _auto_map_modules(auto_map):
        file = os.path.join(path, *module.split(".")) + ".py"
        files.add(file)
        with contextlib.suppress(OSError, UnicodeDecodeError):  # a missing or unreadable file is still listed
            files.update(get_relative_import_files(file))
    return sorted(os.path.relpath(file, path) for file in files)


def require_trust(path: str, label: str, trust_remote_code: bool) -> None:
    """Refuse to load ``path``'s own code without ``--trust_remote_code``; call before anything of it is imported.

    Args:
        path: the folder whose config.json has an ``auto_map``.
        label: how the message names the folder (``--vision_tower '/x/InternViT'``).
        trust_remote_code: the user's consent.

    Raises:
        ValueError: no consent, naming the folder, the flag and the Python files that would run.
    """
    if trust_remote_code:
        return
    files = ", ".join(remote_code_files(path)) or "Python files of the folder"
    raise ValueError(f"{label}: its config.json has an auto_map, so loading it runs {files}; pass "
                     "--trust_remote_code True if you trust this folder")


def auto_map_entry(path: str, auto_class: str, label: Optional[str] = None) -> str:
    """``config.json``'s ``auto_map[auto_class]`` (``"module.ClassName"``).

    Raises:
        ValueError: the folder's config.json has no such entry.
    """
    label = label or repr(path)
    with open(os.path.join(path, CONFIG_FILE)) as fh:
        entry = (json.load(fh).get("auto_map") or {}).get(auto_class)
    if not isinstance(entry, str) or "." not in entry:
        raise ValueError(f"{label}: config.json has no auto_map.{auto_class} entry naming module.Class; use the "
                         "folder as released (config.json with its configuration_*.py and modeling_*.py)")
    return entry


def load_remote_config(path: str, trust_remote_code: bool, label: Optional[str] = None):
    """The folder's config, of the class its ``auto_map.AutoConfig`` names (that class's ``from_pretrained``).

    Raises:
        ValueError: ``trust_remote_code`` is False.
        RemoteCodeError / ImportError: the folder's code fails (a package it imports is missing).
    """
    from transformers import AutoConfig

    require_trust(path, label or repr(path), trust_remote_code)
    with timm_standin(), folder_code("its config class's from_pretrained"):
        return AutoConfig.from_pretrained(path, trust_remote_code=True, local_files_only=True)


def remote_class(path: str, auto_class: str, trust_remote_code: bool, label: Optional[str] = None) -> type:
    """The class ``auto_map[auto_class]`` names, imported from the folder's ``.py`` files (timm stood in
    for where it is missing).

    Raises:
        ValueError: ``trust_remote_code`` is False, or no such ``auto_map`` entry.
        RemoteCodeError / ImportError: the folder's code fails (a package it imports is missing).
    """
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    label = label or repr(path)
    require_trust(path, label, trust_remote_code)
    entry = auto_map_entry(path, auto_class, label)
    with timm_standin(), folder_code(f"importing {entry}"):
        return get_class_from_dynamic_module(entry, path, local_files_only=True)


@contextlib.contextmanager
def _construction(dtype: torch.dtype):
    """Parameters created in ``dtype``; inside ``deepspeed.zero.Init`` when transformers' ZeRO-3 config
    (``HfDeepSpeedConfig``, see :func:`vitacore.model.loading.zero3_construction`) is live."""
    from transformers.integrations.deepspeed import deepspeed_config, is_deepspeed_zero3_enabled

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        if is_deepspeed_zero3_enabled():
            import deepspeed

            with deepspeed.zero.Init(config_dict_or_path=deepspeed_config()):
                yield
        else:
            yield
    finally:
        torch.set_default_dtype(previous)


def build_remote_model(path: str, config, dtype: torch.dtype, trust_remote_code: bool,
                       label: Optional[str] = None) -> nn.Module:
    """A model of the class ``auto_map.AutoModel`` names, built from ``config`` with the class's own
    initial values, in eval mode; partitioned under a live ZeRO-3 config.

    The post-init state transformers expects (``all_tied_weights_keys`` ...) is completed where the
    class's ``__init__`` skipped ``post_init()`` (InternViT's does).

    Raises:
        ValueError: ``trust_remote_code`` is False, or no ``auto_map.AutoModel`` entry.
        RemoteCodeError / ImportError: the folder's code fails (a package it imports is missing).
    """
    model_class = remote_class(path, "AutoModel", trust_remote_code, label)
    with _construction(dtype), folder_code(f"{model_class.__name__}(config)"):
        model = model_class(config)
    if not hasattr(model, "all_tied_weights_keys"):  # __init__ never called post_init()
        with folder_code(f"{model_class.__name__}.post_init()"):
            model.post_init()
    return model.eval()


class WeightFiles:
    """The tensors of a folder's weights (safetensors or torch, single file or sharded), by key.

    Raises:
        FileNotFoundError: none of model.safetensors, its index, pytorch_model.bin or its index.
    """

    def __init__(self, path: str, label: Optional[str] = None):
        self.path, self.label = path, label or repr(path)
        self.file_of: dict[str, str] = {}
        self._torch_files: dict[str, dict] = {}  # torch checkpoints, memory-mapped once each
        for index in (SAFETENSORS_INDEX, TORCH_INDEX):
            if os.path.isfile(os.path.join(path, index)):
                with open(os.path.join(path, index)) as fh:
                    self.file_of = {k: os.path.join(path, f) for k, f in json.load(fh)["weight_map"].items()}
                break
        else:
            for single in (SAFETENSORS_FILE, TORCH_FILE):
                if os.path.isfile(os.path.join(path, single)):
                    self.file_of = {key: os.path.join(path, single) for key in self._keys(os.path.join(path, single))}
                    break
            else:
                raise FileNotFoundError(f"{self.label}: no weights ({SAFETENSORS_FILE}, {TORCH_FILE} or their sharded "
                                        "index); use the folder as released, weights included")

    def _keys(self, file: str) -> list[str]:
        if file.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(file, "pt") as reader:
                return list(reader.keys())
        return list(self._torch_state(file))

    def _torch_state(self, file: str) -> dict:
        if file not in self._torch_files:
            self._torch_files[file] = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        return self._torch_files[file]

    def shape(self, key: str) -> tuple:
        """The stored shape of ``key`` (read from the header for safetensors)."""
        file = self.file_of[key]
        if file.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(file, "pt") as reader:
                return tuple(reader.get_slice(key).get_shape())
        return tuple(self._torch_state(file)[key].shape)

    def read(self, keys) -> dict[str, torch.Tensor]:
        """The tensors of ``keys``, each file opened once."""
        from safetensors import safe_open

        by_file: dict[str, list[str]] = {}
        for key in keys:
            by_file.setdefault(self.file_of[key], []).append(key)
        out = {}
        for file, names in by_file.items():
            if file.endswith(".safetensors"):
                with safe_open(file, "pt") as reader:
                    out.update({name: reader.get_tensor(name) for name in names})
            else:
                out.update({name: self._torch_state(file)[name] for name in names})
        return out


def _expected_shapes(model: nn.Module) -> dict[str, tuple]:
    """Every state-dict key of ``model`` and its full shape (a ZeRO-3 partitioned parameter's ``ds_shape``)."""
    tensors = dict(model.named_parameters(remove_duplicate=False))
    tensors.update(model.named_buffers(remove_duplicate=False))
    return {key: tuple(getattr(tensors[key], "ds_shape", tensors[key].shape)) for key in model.state_dict()}


def check_weight_keys(model: nn.Module, files: WeightFiles) -> None:
    """Refuse weights that do not fit ``model`` exactly (every rank checks, so all fail together).

    Raises:
        ValueError: naming the folder and the first missing, unexpected or differently shaped key.
    """
    expected = _expected_shapes(model)
    missing = sorted(set(expected) - set(files.file_of))
    unexpected = sorted(set(files.file_of) - set(expected))
    if missing:
        raise ValueError(f"{files.label}: the weights have no {missing[0]!r} ({len(missing)} key(s) missing), which "
                         "the model its code builds needs; the weights do not belong to this config.json and .py "
                         "files")
    if unexpected:
        raise ValueError(f"{files.label}: the weights hold {unexpected[0]!r} ({len(unexpected)} key(s) unexpected), "
                         "which the model its code builds does not have; the weights do not belong to this "
                         "config.json and .py files")
    for key, shape in expected.items():
        stored = files.shape(key)
        if stored != shape:
            raise ValueError(f"{files.label}: {key!r} has shape {stored} in the weights but {shape} in the model its "
                             "config.json describes; the weights do not belong to this config.json")


def load_remote_weights(model: nn.Module, path: str, label: Optional[str] = None) -> None:
    """Load ``path``'s weights into ``model`` strictly, cast to each parameter's dtype.

    Under ZeRO-3 (partitioned parameters), every rank calls this: each module's own parameters are
    gathered with ``modifier_rank=0``, rank 0 fills them from the files, and DeepSpeed re-partitions
    rank 0's values on exit; only rank 0 reads parameter tensors.

    Raises:
        FileNotFoundError: the folder has no weights file.
        ValueError: keys or shapes that do not fit (see :func:`check_weight_keys`).
    """
    files = WeightFiles(path, label)
    check_weight_keys(model, files)
    if not any(hasattr(p, "ds_id") for p in model.parameters()):
        model.load_state_dict(files.read(model.state_dict().keys()), strict=True)
        return
    import deepspeed

    rank0 = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
    with torch.no_grad():
        for prefix, module in model.named_modules():
            params = dict(module.named_parameters(recurse=False))
            buffers = {name: b for name, b in module.named_buffers(recurse=False)
                       if name not in module._non_persistent_buffers_set}
            if not params and not buffers:
                continue
            base = f"{prefix}." if prefix else ""
            with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=0):
                names = ({**params, **buffers} if rank0 else buffers).items()
                values = files.read(base + name for name, _ in names)
                for name, tensor in names:
                    tensor.data.copy_(values[base + name].to(tensor.dtype))
