"""Tests for vitacore.checkpoint.artifacts: VITA-compatible adapter files."""

import os

import pytest
import torch
import torch.nn as nn

from vitacore.checkpoint.artifacts import (
    AUDIO_ADAPTER_FILE,
    MM_PROJECTOR_FILE,
    atomic_torch_save,
    read_adapter_file,
    save_stage_artifacts,
)
from vitacore.model import load_adapter_weights
from vitacore.model.audio import AudioAdapter
from vitacore.model.projector import build_projector

VISION, AUDIO, HIDDEN = 12, 6, 20
PROJECTOR_FLAG = "--pretrain_mm_mlp_adapter"
AUDIO_FLAG = "--pretrain_audio_mlp_adapter"


class Holder(nn.Module):
    """Just the attributes save_stage_artifacts reads from a VitaModel."""

    def __init__(self, projector_type="mlp2x_gelu", dtype=torch.float32):
        super().__init__()
        self.mm_projector = build_projector(projector_type, VISION, HIDDEN).to(dtype)
        self.audio_adapter = AudioAdapter(AUDIO, HIDDEN).to(dtype)


@pytest.fixture
def model():
    torch.manual_seed(0)
    return Holder()


def load_adapter_file(path, module, key_marker, flag):
    """The old one-call loader: read the file (vitacore.checkpoint), then fill the module (vitacore.model)."""
    load_adapter_weights(module, read_adapter_file(path, key_marker, flag))


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def test_projector_file_has_vitas_keys(tmp_path, model):
    written = save_stage_artifacts(model, str(tmp_path / "out"), {"mm_projector"}, is_main=True)
    path = tmp_path / "out" / MM_PROJECTOR_FILE
    assert MM_PROJECTOR_FILE == "mm_projector.bin"
    assert written == {MM_PROJECTOR_FILE: str(path)}
    state = _load(path)
    assert set(state) == {"model.mm_projector.0.weight", "model.mm_projector.0.bias",
                          "model.mm_projector.2.weight", "model.mm_projector.2.bias"}
    assert torch.equal(state["model.mm_projector.2.weight"], model.mm_projector[2].weight.detach())
    assert all(t.device.type == "cpu" for t in state.values())
    assert not (tmp_path / "out" / AUDIO_ADAPTER_FILE).exists()


def test_vita_loading_rule_reproduces_projector_outputs(tmp_path, model):
    save_stage_artifacts(model, str(tmp_path), {"mm_projector", "llm"}, is_main=True)
    weights = _load(tmp_path / MM_PROJECTOR_FILE)
    # the rule VITA's builder applies to --pretrain_mm_mlp_adapter files
    state = {k.split("mm_projector.")[1]: v for k, v in weights.items() if "mm_projector" in k}
    fresh = nn.Sequential(nn.Linear(VISION, HIDDEN), nn.GELU(), nn.Linear(HIDDEN, HIDDEN))
    fresh.load_state_dict(state, strict=True)
    features = torch.randn(3, 4, VISION)
    with torch.no_grad():
        torch.testing.assert_close(fresh(features), model.mm_projector(features), rtol=0, atol=0)


def test_audio_adapter_file_has_vitas_keys_and_round_trips(tmp_path, model):
    written = save_stage_artifacts(model, str(tmp_path), {"audio_adapter", "mm_projector"}, is_main=True)
    assert AUDIO_ADAPTER_FILE == "audio_adpter.bin"
    assert set(written) == {MM_PROJECTOR_FILE, AUDIO_ADAPTER_FILE}
    state = _load(tmp_path / AUDIO_ADAPTER_FILE)
    expected = {f"model.audio_encoder.adpter.{k}" for k in model.audio_adapter.state_dict()}
    assert set(state) == expected
    assert {"model.audio_encoder.adpter.conv1d2.weight", "model.audio_encoder.adpter.bn2.bias",
            "model.audio_encoder.adpter.project.weight"} <= set(state)

    fresh = AudioAdapter(AUDIO, HIDDEN)
    load_adapter_file(str(tmp_path / AUDIO_ADAPTER_FILE), fresh, "audio_encoder.adpter.", AUDIO_FLAG)
    x = torch.randn(2, 9, AUDIO)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model.audio_adapter(x), rtol=0, atol=0)


def test_units_not_trained_write_nothing(tmp_path, model):
    assert save_stage_artifacts(model, str(tmp_path / "out"), {"llm", "vision_tower"}, is_main=True) == {}
    assert not (tmp_path / "out").exists()


def test_missing_module_is_skipped(tmp_path):
    holder = nn.Module()
    holder.mm_projector = None
    assert save_stage_artifacts(holder, str(tmp_path), {"mm_projector", "audio_adapter"}, is_main=True) == {}
    assert os.listdir(tmp_path) == []


def test_non_main_rank_writes_nothing(tmp_path, model):
    out = tmp_path / "out"
    written = save_stage_artifacts(model, str(out), {"mm_projector", "audio_adapter"}, is_main=False)
    assert set(written) == {MM_PROJECTOR_FILE, AUDIO_ADAPTER_FILE}
    assert not out.exists()


def test_dtype_is_preserved(tmp_path):
    model = Holder(dtype=torch.bfloat16)
    save_stage_artifacts(model, str(tmp_path), {"mm_projector"}, is_main=True)
    assert {t.dtype for t in _load(tmp_path / MM_PROJECTOR_FILE).values()} == {torch.bfloat16}


def test_load_adapter_file_into_projector(tmp_path, model):
    save_stage_artifacts(model, str(tmp_path), {"mm_projector"}, is_main=True)
    fresh = build_projector("mlp2x_gelu", VISION, HIDDEN)
    load_adapter_file(str(tmp_path / MM_PROJECTOR_FILE), fresh, "mm_projector.", PROJECTOR_FLAG)
    for key, value in model.mm_projector.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key


def test_wrong_shape_names_flag_and_both_shapes(tmp_path, model):
    save_stage_artifacts(model, str(tmp_path), {"mm_projector"}, is_main=True)
    other = build_projector("mlp2x_gelu", VISION, HIDDEN + 4)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError) as err:
        load_adapter_file(str(tmp_path / MM_PROJECTOR_FILE), other, "mm_projector.", PROJECTOR_FLAG)
    message = str(err.value)
    assert PROJECTOR_FLAG in message
    assert str((HIDDEN, VISION)) in message  # in the file
    assert str((HIDDEN + 4, VISION)) in message  # what the model needs
    assert MM_PROJECTOR_FILE in message
    # nothing was loaded
    assert all(torch.equal(other.state_dict()[k], v) for k, v in before.items())


def test_missing_file_names_the_flag(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        load_adapter_file(str(tmp_path / "nope.bin"), build_projector("linear", 2, 2), "mm_projector.", PROJECTOR_FLAG)
    assert PROJECTOR_FLAG in str(err.value) and "nope.bin" in str(err.value)


def test_file_without_matching_keys_raises(tmp_path):
    path = tmp_path / "other.bin"
    torch.save({"model.something_else.weight": torch.zeros(2, 2)}, path)
    with pytest.raises(ValueError) as err:
        load_adapter_file(str(path), build_projector("linear", 2, 2), "mm_projector.", PROJECTOR_FLAG)
    assert PROJECTOR_FLAG in str(err.value) and "mm_projector." in str(err.value)


def test_missing_and_unexpected_keys_raise(tmp_path, model):
    save_stage_artifacts(model, str(tmp_path), {"mm_projector"}, is_main=True)
    deeper = build_projector("mlp3x_gelu", VISION, HIDDEN)
    with pytest.raises(ValueError) as err:
        load_adapter_file(str(tmp_path / MM_PROJECTOR_FILE), deeper, "mm_projector.", PROJECTOR_FLAG)
    assert "4.weight" in str(err.value) and PROJECTOR_FLAG in str(err.value)
    linear = build_projector("linear", VISION, HIDDEN)
    with pytest.raises(ValueError, match="unexpected"):
        load_adapter_file(str(tmp_path / MM_PROJECTOR_FILE), linear, "mm_projector.", PROJECTOR_FLAG)


def test_atomic_save_leaves_no_temp_file_and_replaces_whole(tmp_path):
    path = tmp_path / "state.bin"
    atomic_torch_save({"big": torch.arange(10_000)}, str(path))
    assert os.listdir(tmp_path) == ["state.bin"]
    first_size = path.stat().st_size
    atomic_torch_save({"small": torch.tensor([1, 2, 3])}, str(path))
    assert os.listdir(tmp_path) == ["state.bin"]
    assert path.stat().st_size < first_size
    loaded = _load(path)
    assert set(loaded) == {"small"}
    assert loaded["small"].tolist() == [1, 2, 3]


def test_atomic_save_failure_keeps_the_old_file(tmp_path):
    path = tmp_path / "state.bin"
    atomic_torch_save({"ok": torch.ones(3)}, str(path))

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("cannot pickle")

    with pytest.raises(RuntimeError):
        atomic_torch_save({"bad": Unpicklable()}, str(path))
    assert torch.equal(_load(path)["ok"], torch.ones(3))


def test_atomic_save_failure_leaves_no_temp_file(tmp_path):
    path = tmp_path / "state.bin"
    atomic_torch_save({"ok": torch.ones(3)}, str(path))

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("cannot pickle")

    with pytest.raises(RuntimeError):
        atomic_torch_save({"bad": Unpicklable()}, str(path))
    assert os.listdir(tmp_path) == ["state.bin"]
