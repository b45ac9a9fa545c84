"""Peak bytes of live tensor storage, counted op by op, on real tensors or on fake ones (no memory).

:class:`LiveTensorBytes` is a ``TorchDispatchMode``: every aten op's output storages are counted
when the op returns, and a weakref finalizer on each storage takes its bytes back off when it dies,
so the running total is the bytes of all live storages and its maximum is the peak. Ops run in
backward pass through the mode too. What it does not see: tensors that existed before it started
unless handed to :meth:`LiveTensorBytes.track`, and a kernel's own scratch buffers, except those of
:data:`SCRATCH` (measured: the kernels that need one as large as their input).

Under ``FakeTensorMode`` tensors have shapes, dtypes and (meta) storages but no data, so a step of
any size costs no memory; yet ops whose output shape depends on values (``nonzero``, boolean-mask
indexing) and ``.item()`` cannot run. :func:`fake_tensors` adds :class:`_KnownValues`, which keeps
the real value of every small integer or boolean tensor computed only from such tensors (token ids,
labels, masks, positions), and answers those ops from the real values.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Iterable, Iterator

import torch
import torch.utils._pytree as pytree
from torch._subclasses.fake_tensor import (
    DataDependentOutputException,
    DynamicOutputShapeException,
    FakeTensor,
    FakeTensorMode,
)
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils.weak import WeakIdKeyDictionary

__all__ = ["SCRATCH", "LiveTensorBytes", "fake_tensors"]

aten = torch.ops.aten

# Kernels that allocate a temporary as large as their input, invisible to a dispatch mode: aten's
# logsumexp computes exp(x - max) out of place (on CPU: a 593 MiB input raised peak resident memory by
# 593 MiB with a 4-byte output). Counted at the op as that many more bytes live.
SCRATCH = {aten.logsumexp.default: lambda args: args[0].numel() * args[0].element_size()}

# Integer / boolean tensors above this many elements keep no real value (a [L, L] mask would be big).
MAX_KNOWN_NUMEL = 1 << 22


class LiveTensorBytes(TorchDispatchMode):
    """Bytes of live tensor storage, and their peak, counted at every op.

    Attributes:
        live: bytes of the storages alive now.
        peak: the most ``live`` has been since the mode started or :meth:`reset_peak`.
    """

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._sizes: dict[int, int] = {}  # storage (its C pointer) -> bytes counted for it

    def track(self, tensors: Iterable[torch.Tensor]) -> None:
        """Count tensors made before the mode started (parameters, inputs)."""
        for tensor in tensors:
            self._account(tensor)

    def reset_peak(self) -> None:
        """Start a new peak from what is live now."""
        self.peak = self.live

    def _account(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key, nbytes = storage._cdata, storage.nbytes()
        counted = self._sizes.get(key)
        if counted is None:
            # Storages keep their Python object while the storage lives, so this fires when it dies.
            weakref.finalize(storage, self._release, key)
        if counted != nbytes:  # new, or resized in place (an ``out=`` op)
            self._sizes[key] = nbytes
            self.live += nbytes - (counted or 0)
            self.peak = max(self.peak, self.live)

    def _release(self, key: int) -> None:
        self.live -= self._sizes.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for leaf in pytree.tree_leaves((out, args, kwargs)):
            if isinstance(leaf, torch.Tensor) and leaf.layout == torch.strided:
                self._account(leaf)
        scratch = SCRATCH.get(func)
        if scratch is not None:
            self.peak = max(self.peak, self.live + scratch(args))
        return out


class _KnownValues(TorchDispatchMode):
    """Real values beside fake tensors, for the small integer tensors data-dependent ops read.

    An op whose tensor inputs all have real values (real constants count as their own; an op may have
    no tensor input) and whose outputs are all small integer / boolean tensors is also run for real,
    and its outputs keep the real results (views of real values, so writes reach every alias). An op
    that fake tensors cannot run (``nonzero``, ``.item()``) is answered from the real values; boolean
    masks indexing a fake tensor are turned into index tensors first. An op that writes into a tensor
    from inputs without real values makes every tensor on that storage unknown.
    """

    def __init__(self, fake_mode: FakeTensorMode):
        super().__init__()
        self.fake_mode = fake_mode
        self.values = WeakIdKeyDictionary()  # fake tensor -> its real value
        self.unknown_storages = WeakIdKeyDictionary()  # fake storages written from unknown inputs

    def from_real(self, tensor: torch.Tensor) -> torch.Tensor:
        """A fake copy of a real tensor (made outside the block); small integer tensors keep their value."""
        if isinstance(tensor, FakeTensor):
            raise ValueError("from_real got a fake tensor: make the real tensor before entering fake_tensors()")
        fake = self.fake_mode.from_tensor(tensor, static_shapes=True)
        if _may_keep(tensor):
            self.values[fake] = tensor
        return fake

    def _value(self, tensor: torch.Tensor):
        if not isinstance(tensor, FakeTensor):
            return tensor  # a real constant (``torch.tensor(1)`` lifted into the fake graph)
        if tensor in self.values and tensor.untyped_storage() not in self.unknown_storages:
            return self.values[tensor]
        return None

    def _known(self, leaves) -> bool:
        return all(self._value(t) is not None for t in leaves if isinstance(t, torch.Tensor))

    def _real(self, func, args, kwargs):
        real_args, real_kwargs = pytree.tree_map_only(torch.Tensor, self._value, (args, kwargs))
        with _disable_current_modes():
            return func(*real_args, **real_kwargs)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        known = self._known(pytree.tree_leaves((args, kwargs)))
        try:
            out = func(*args, **kwargs)
        except (DataDependentOutputException, DynamicOutputShapeException):
            if known:
                real = self._real(func, args, kwargs)
                return pytree.tree_map_only(torch.Tensor, self.from_real, real)
            if func is aten.index.Tensor:
                return func(args[0], self._integer_indices(args[1]))
            raise
        outputs = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
        if known and outputs and all(_may_keep(t) for t in outputs):
            real_out = pytree.tree_leaves(self._real(func, args, kwargs))
            for fake, real in zip(outputs, [t for t in real_out if isinstance(t, torch.Tensor)]):
                self.values[fake] = real
        elif not known:
            for position, argument in enumerate(func._schema.arguments):
                value = args[position] if position < len(args) else kwargs.get(argument.name)
                if argument.alias_info is not None and argument.alias_info.is_write and isinstance(value, FakeTensor):
                    self.unknown_storages[value.untyped_storage()] = True  # written from something unknown
        return out

    def _integer_indices(self, indices):
        """Boolean masks with real values -> the index tensors they select (what aten does inside)."""
        converted = []
        for index in indices:
            if index is None or index.dtype not in (torch.bool, torch.uint8):
                converted.append(index)
                continue
            value = self._value(index)
            if value is None:
                raise ValueError("a boolean mask without a real value indexes a fake tensor; "
                                 "make the mask from the inputs' real values")
            with _disable_current_modes():
                selected = value.nonzero().unbind(1)
            converted.extend(self.from_real(part) for part in selected)
        return converted


def _may_keep(tensor: torch.Tensor) -> bool:
    return (not tensor.dtype.is_floating_point and not tensor.dtype.is_complex
            and tensor.numel() <= MAX_KNOWN_NUMEL)


@contextlib.contextmanager
def fake_tensors() -> Iterator[_KnownValues]:
    """Fake tensors for the block (no data, no memory), with real values where data-dependent ops need them.

    Yields the value keeper: ``keeper.from_real(t)`` turns a real input into a fake one that keeps its
    value. Models built inside the block get fake parameters.
    """
    fake_mode = FakeTensorMode(allow_non_fake_inputs=False)
    keeper = _KnownValues(fake_mode)
    with fake_mode, keeper:
        yield keeper
