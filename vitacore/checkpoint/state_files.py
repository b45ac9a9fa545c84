"""The small files of a checkpoint that vitacore itself writes and reads: each rank's random generator
states (``rng_state_<rank>.pth``) and the loop state (``vitacore_state.json``).

Both are read without running code from the file: the RNG files hold only tensors, numbers and
strings and are loaded with ``torch.load(weights_only=True)``; the state is JSON. A file that needs
more (a pickle that names classes or functions, e.g. a planted one) is refused, naming it.
"""

from __future__ import annotations

import json
import os
import random

import numpy as np
import torch

from vitacore._version import __version__
from vitacore.checkpoint.artifacts import atomic_torch_save
from vitacore.checkpoint.folders import LEGACY_STATE_FILE, STATE_FILE
from vitacore.checkpoint.manifest import read_json_object
from vitacore.durable import atomic_write


def rng_file(folder: str, rank: int) -> str:
    """The path of ``rank``'s generator states in a checkpoint folder."""
    return os.path.join(folder, f"rng_state_{rank}.pth")


def rng_states() -> dict:
    """This process's python / numpy / torch / CUDA generator states, in weight-only-loadable form."""
    version, python_state, gauss = random.getstate()
    kind, numpy_keys, position, has_gauss, cached = np.random.get_state()
    states = {"python": {"version": version, "state": torch.tensor(python_state, dtype=torch.int64),
                         "gauss_next": gauss},
              "numpy": {"kind": kind, "keys": torch.from_numpy(numpy_keys.astype(np.int64)), "pos": int(position),
                        "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
              "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng(states: dict) -> None:
    """Put the generators back in the states :func:`rng_states` returned (or the tuples earlier versions saved)."""
    python = states["python"]
    if isinstance(python, dict):
        python = (python["version"], tuple(int(x) for x in python["state"].tolist()), python["gauss_next"])
    random.setstate(tuple(python))
    numpy_state = states["numpy"]
    if isinstance(numpy_state, dict):
        numpy_state = (numpy_state["kind"], numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"],
                       numpy_state["has_gauss"], numpy_state["cached_gaussian"])
    np.random.set_state(numpy_state)
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _numpy_array_globals() -> list:
    """What a pickled numpy array names: its constructors, which build data and run nothing else."""
    multiarray = getattr(np, "_core", None) or np.core
    return [multiarray.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def save_rng(folder: str, rank: int) -> None:
    """Write this rank's generator states into a checkpoint folder (atomically, fsynced)."""
    atomic_torch_save(rng_states(), rng_file(folder, rank))


def load_rng(folder: str, rank: int) -> dict:
    """Read ``rank``'s generator states without running any code from the file.

    Raises:
        ValueError / FileNotFoundError: naming the file (missing, damaged, or not plain data).
    """
    path = rng_file(folder, rank)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: missing (this rank's random generator states); the checkpoint is "
                                "incomplete")
    try:
        # Earlier versions stored numpy's state as an array: its constructors are the only names allowed.
        with torch.serialization.safe_globals(_numpy_array_globals()):
            states = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same message with its path
        # torch's own text advises full unpickling, which is what must not happen to a received file.
        raise ValueError(f"{path}: not loadable as plain tensors and numbers, so it is not read (it may be "
                         f"damaged, or planted to run code; {type(err).__name__})") from err
    if not isinstance(states, dict) or not {"python", "numpy", "torch"} <= set(states):
        raise ValueError(f"{path}: not a vitacore random-state file (python / numpy / torch states expected)")
    return states


def versions() -> dict:
    """The library versions a checkpoint records."""
    import deepspeed  # imported by the engine already; kept out of this module's import for light tools
    import transformers

    return {"vitacore": __version__, "torch": torch.__version__, "deepspeed": deepspeed.__version__,
            "transformers": transformers.__version__}


def write_trainer_state(folder: str, state: dict) -> None:
    """Write ``vitacore_state.json`` (atomically, fsynced)."""
    def write(tmp: str) -> None:
        with open(tmp, "w") as fh:
            json.dump(state, fh, indent=1)

    atomic_write(os.path.join(folder, STATE_FILE), write)


def read_trainer_state(path: str) -> dict:
    """The ``vitacore_state.json`` of a checkpoint folder (``trainer_state.json`` in older ones).

    Raises:
        ValueError / FileNotFoundError: naming the file.
    """
    name = STATE_FILE if os.path.exists(os.path.join(path, STATE_FILE)) else LEGACY_STATE_FILE
    file = os.path.join(path, name)
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{os.path.join(path, STATE_FILE)}: missing; the checkpoint is incomplete")
    return read_json_object(file, "the checkpoint's loop state")
