"""Weight files a user may receive are unpickled weights-only, and a bad one is one message naming the
flag (or folder) and the file: adapter files (``--pretrain_mm_mlp_adapter``, ``--pretrain_audio_mlp_adapter``),
``non_lora_trainables.bin``, and DeepSpeed's state files read by the ``export`` tool.

The hostile pickle is a dict whose value unpickles by calling ``exec`` (a builtin, so a full unpickler
anywhere would run it) on code that writes a marker file.
"""

import json
import time

import pytest
import torch
import torch.nn as nn

from vitacore.checkpoint import load_non_lora_trainables, read_adapter_file
from vitacore.config import parse_args
from vitacore.recipes import plan_model, recipe_main
from vitacore.recipes.tools import main as tools_main


class _Payload:
    """Unpickles as ``exec(code)``."""

    def __init__(self, code: str):
        self.code = code

    def __reduce__(self):
        return exec, (self.code,)


def hostile_pickle(path, marker, key="model.mm_projector.0.weight") -> str:
    """A torch.save file holding ``{key: payload}``; fully unpickled, it writes ``marker``."""
    torch.save({key: _Payload(f"open({str(marker)!r}, 'w').write('ran')")}, str(path))
    return str(path)


def test_hostile_pickle_as_mm_projector_is_refused_naming_flag_and_file(tmp_path, vitacore_cache, capsys):
    """Setup: ``--pretrain_mm_mlp_adapter`` a mm_projector.bin whose pickle calls exec (writes a marker).
    Expect: exit 2 within 30 s, the message names the flag and the file and says it holds more than
    tensors, no traceback, no marker; the control (a full unpickle) does write the marker."""
    marker = tmp_path / "code_ran.txt"
    path = hostile_pickle(tmp_path / "mm_projector.bin", marker)
    start = time.monotonic()
    code = recipe_main(["--pretrain_mm_mlp_adapter", path, "--output_dir", str(tmp_path / "out"), "--max_steps", "1"])
    elapsed = time.monotonic() - start
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"error: --pretrain_mm_mlp_adapter {path!r}: the file holds more than tensors" in err
    assert "Traceback" not in err and not marker.exists() and elapsed < 30, elapsed
    torch.load(path, weights_only=False)  # control: the payload is live
    assert marker.exists()


def test_truncated_audio_adapter_is_refused_naming_flag_and_file(tmp_path, vitacore_cache, capsys):
    """Setup: ``--pretrain_audio_mlp_adapter`` an audio_adpter.bin cut to half its size (a partial copy).
    Expect: exit 2 within 30 s, one line naming the flag and the file as unreadable or truncated, no traceback."""
    path = str(tmp_path / "audio_adpter.bin")
    torch.save({"model.audio_encoder.adpter.project.weight": torch.randn(64, 64)}, path)
    with open(path, "rb") as fh:
        data = fh.read()
    with open(path, "wb") as fh:
        fh.write(data[: len(data) // 2])
    start = time.monotonic()
    code = recipe_main(["--stage", "2", "--pretrain_audio_mlp_adapter", path, "--output_dir", str(tmp_path / "out"),
                        "--max_steps", "1"])
    elapsed = time.monotonic() - start
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"error: --pretrain_audio_mlp_adapter {path!r}: unreadable, truncated or not a torch.save file" in err
    assert "Traceback" not in err and elapsed < 30, elapsed


def _bad_adapter_files(tmp_path, marker) -> dict:
    folder = tmp_path / "a_folder"
    folder.mkdir()
    truncated = tmp_path / "truncated.bin"
    torch.save({"model.mm_projector.0.weight": torch.ones(8, 8)}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:100])
    not_a_dict = tmp_path / "list.bin"
    torch.save([torch.ones(2)], not_a_dict)
    wrong_keys = tmp_path / "wrong_keys.bin"
    torch.save({"model.other.0.weight": torch.ones(2)}, wrong_keys)
    return {
        "not a file": (str(folder), "not a file"),
        "pickle with code": (hostile_pickle(tmp_path / "evil.bin", marker), "holds more than tensors"),
        "truncated": (str(truncated), "unreadable, truncated"),
        "not a state dict": (str(not_a_dict), "expected a dict of named tensors"),
        "wrong keys": (str(wrong_keys), "no key contains 'mm_projector.'"),
    }


def test_every_bad_adapter_file_is_a_value_error_naming_flag_and_file(tmp_path):
    """Setup: --pretrain_mm_mlp_adapter given a folder, a pickle with code, a truncated file, a list of
    tensors, a dict without projector keys. Expect: each a ValueError naming the flag and the file; no marker."""
    marker = tmp_path / "code_ran.txt"
    for case, (path, message) in _bad_adapter_files(tmp_path, marker).items():
        with pytest.raises(ValueError) as err:
            read_adapter_file(path, "mm_projector.", "--pretrain_mm_mlp_adapter")
        assert f"--pretrain_mm_mlp_adapter {path!r}: " in str(err.value), case
        assert message in str(err.value), (case, str(err.value))
    assert not marker.exists()


def test_hostile_non_lora_trainables_is_refused_naming_the_folder(tmp_path):
    """Setup: a LoRA run folder whose non_lora_trainables.bin pickle calls exec. Expect: a ValueError
    naming the folder and the file; no marker."""
    marker = tmp_path / "code_ran.txt"
    path = hostile_pickle(tmp_path / "non_lora_trainables.bin", marker, key="base_model.model.mm_projector.0.weight")
    with pytest.raises(ValueError) as err:
        load_non_lora_trainables(path, nn.Linear(2, 2), origin=f"merge-lora {str(tmp_path)!r}")
    assert f"merge-lora {str(tmp_path)!r}: non_lora_trainables.bin {path!r}: the file holds more than" in str(err.value)
    assert not marker.exists()


@pytest.mark.parametrize("layout", ["zero0", "zero2"])
def test_export_tool_refuses_a_hostile_deepspeed_state_file(tmp_path, vitacore_cache, capsys, layout):
    """Setup: a received checkpoint-1/ (embedded default model, no tower) whose DeepSpeed file pickle calls
    exec: ZeRO-0's mp_rank_00_model_states.pt, or a ZeRO-2 optimizer file beside zero_to_fp32.py.
    Expect: ``export`` exits 2 within 30 s naming the file, no marker, no export written."""
    checkpoint, marker = tmp_path / "checkpoint-1", tmp_path / "code_ran.txt"
    (checkpoint / "state").mkdir(parents=True)
    config = parse_args(["--output_dir", str(tmp_path)])
    plan_model(config, with_data=False).config.to_yaml(str(checkpoint / "config.yaml"))
    (checkpoint / "checkpoint_complete.json").write_text(json.dumps({"step": 1}))
    (checkpoint / "vitacore_state.json").write_text(json.dumps({"identity": {"trainable": {}}}))
    if layout == "zero0":
        hostile = hostile_pickle(checkpoint / "state" / "mp_rank_00_model_states.pt", marker, key="module")
    else:
        torch.save({"module": {}}, str(checkpoint / "state" / "mp_rank_00_model_states.pt"))
        hostile = hostile_pickle(checkpoint / "state" / "zero_pp_rank_0_mp_rank_00_optim_states.pt", marker,
                                 key="optimizer_state_dict")
        (checkpoint / "zero_to_fp32.py").write_text("# DeepSpeed's script\n")
    start = time.monotonic()
    code = tools_main(["export", str(checkpoint), str(tmp_path / "export")])
    elapsed = time.monotonic() - start
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"error: export {str(checkpoint)!r}: {hostile} holds more than DeepSpeed's state" in err
    assert not marker.exists() and not (tmp_path / "export").exists() and elapsed < 30, elapsed
