"""A tower folder whose config.json has an ``auto_map`` (InternViT) runs its Python files only with
``--trust_remote_code True``: through ``--vision_tower``, a full export's ``vision_tower/`` folder, the
tower path an export's config.json records, the ``export`` tool and ``python -m vitacore.generate``.

Each tower is laid out as InternViT-300M-448px is released (``tiny_models.write_real_internvit``), with
one line added at the top of both ``.py`` files that writes a marker file when the file is imported.
"""

import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch
from launch import env_for
from tiny_models import write_real_internvit

from vitacore.checkpoint.export import save_full_export
from vitacore.config import parse_args
from vitacore.model.vision import load_vision_tower
from vitacore.recipes import build_model_from_config, plan_model, recipe_main
from vitacore.recipes.inference import main as generate_main

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(REPO, "examples", "train_stage.py")
CODE_FILES = "configuration_intern_vit.py, modeling_intern_vit.py"
CONSENT = "pass --trust_remote_code True if you trust this folder"


def marked_tower(root) -> tuple[str, str]:
    """An InternViT folder whose two .py files write ``marker`` when imported; returns (folder, marker)."""
    folder = write_real_internvit(os.path.join(str(root), "InternViT-300M-448px"))
    marker = os.path.join(str(root), "code_ran.txt")
    for name in ("configuration_intern_vit.py", "modeling_intern_vit.py"):
        path = os.path.join(folder, name)
        with open(path) as fh:
            code = fh.read()
        with open(path, "w") as fh:
            fh.write(f"open({marker!r}, 'a').write({name!r} + '\\n')\n{code}")
    return folder, marker


def test_train_stage_refuses_an_untrusted_tower_before_its_code_runs(tmp_path, vitacore_cache):
    """Setup: ``python examples/train_stage.py --vision_tower <InternViT folder whose .py files write a marker>``
    without ``--trust_remote_code``. Expect: exit 2 within 60 s, one line naming the flag, the folder and
    both .py files, no traceback, no marker; the control (consent given) does write the marker."""
    tower, marker = marked_tower(tmp_path)
    start = time.monotonic()
    result = subprocess.run([sys.executable, SCRIPT, "--vision_tower", tower, "--output_dir", str(tmp_path / "out"),
                             "--max_steps", "1"], capture_output=True, text=True, env=env_for(vitacore_cache),
                            timeout=300, cwd=REPO)
    elapsed = time.monotonic() - start
    assert result.returncode == 2, result.stderr[-3000:]
    assert (f"error: --vision_tower {tower!r}: its config.json has an auto_map, so loading it runs {CODE_FILES}; "
            f"{CONSENT}") in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert not os.path.exists(marker)
    assert elapsed < 60, elapsed
    # Control: the same folder with consent imports its files, so the marker above could have appeared.
    load_vision_tower(tower, trust_remote_code=True)
    assert os.path.exists(marker)


@pytest.fixture
def marked_export(tmp_path, vitacore_cache):
    """A full export (embedded default LLM + the marked tower) whose vision_tower/ folder holds the marked code."""
    tower, marker = marked_tower(tmp_path)
    config = parse_args(["--vision_tower", tower, "--trust_remote_code", "True", "--output_dir", str(tmp_path / "r")])
    bundle = build_model_from_config(config)[0]
    export = str(tmp_path / "export")
    save_full_export(bundle.model, bundle.tokenizer, export, is_main=True, dtype=torch.float32)
    os.remove(marker)  # the build above ran the code, with consent
    return export, tower, marker


def test_a_full_exports_tower_folder_and_recorded_path_need_consent(marked_export, tmp_path, capsys):
    """Setup: ``--model_name_or_path`` a full export whose vision_tower/ holds the marked code, without
    ``--trust_remote_code``; then the same export without vision_tower/, so the tower path its config.json
    records (mm_vision_tower) is used. Expect: both runs exit 2 within 30 s naming the export, the folder
    and both .py files; no marker."""
    export, tower, marker = marked_export
    start = time.monotonic()
    code = recipe_main(["--model_name_or_path", export, "--output_dir", str(tmp_path / "out1"), "--max_steps", "1"])
    elapsed = time.monotonic() - start
    err = capsys.readouterr().err
    assert code == 2, err
    own = os.path.join(export, "vision_tower")
    assert (f"error: --model_name_or_path {export!r} (the vision_tower/ folder {own!r}): its config.json has an "
            f"auto_map, so loading it runs {CODE_FILES}; {CONSENT}") in err
    assert not os.path.exists(marker) and elapsed < 30, elapsed

    shutil.rmtree(own)
    assert json.load(open(os.path.join(export, "config.json")))["mm_vision_tower"] == os.path.abspath(tower)
    code = recipe_main(["--model_name_or_path", export, "--output_dir", str(tmp_path / "out2"), "--max_steps", "1"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert (f"error: --model_name_or_path {export!r} (mm_vision_tower in config.json {os.path.abspath(tower)!r}): its "
            f"config.json has an auto_map, so loading it runs {CODE_FILES}; {CONSENT}") in err
    assert not os.path.exists(marker)


def _downloaded_checkpoint(folder, tower) -> str:
    """A checkpoint folder as received from elsewhere: its config.yaml names the marked tower and claims
    ``trust_remote_code: true`` (consent written by someone else)."""
    os.makedirs(folder)
    config = parse_args(["--vision_tower", tower, "--trust_remote_code", "True", "--output_dir", str(folder)])
    plan_model(config, with_data=False).config.to_yaml(os.path.join(folder, "config.yaml"))  # as a run saves it
    with open(os.path.join(folder, "checkpoint_complete.json"), "w") as fh:
        json.dump({"step": 1}, fh)
    with open(os.path.join(folder, "vitacore_state.json"), "w") as fh:
        json.dump({"identity": {"trainable": {}}}, fh)
    return str(folder)


def test_export_tool_and_generate_ignore_consent_recorded_in_config_yaml(tmp_path, vitacore_cache, capsys):
    """Setup: a checkpoint-1/ whose config.yaml names the marked tower and says trust_remote_code: true;
    ``python -m vitacore.checkpoint export`` and ``python -m vitacore.generate`` on it without the tools'
    own ``--trust_remote_code``. Expect: both exit 2 within 60 s naming the folder and both .py files;
    no marker, no export written."""
    tower, marker = marked_tower(tmp_path)
    checkpoint = _downloaded_checkpoint(tmp_path / "checkpoint-1", tower)
    out = tmp_path / "export"
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "vitacore.checkpoint", "export", checkpoint, str(out)],
                            capture_output=True, text=True, env=env_for(vitacore_cache), timeout=300, cwd=REPO)
    elapsed = time.monotonic() - start
    assert result.returncode == 2, result.stderr[-3000:]
    expected = f"--vision_tower {tower!r}: its config.json has an auto_map, so loading it runs {CODE_FILES}; {CONSENT}"
    assert f"error: {expected}" in result.stderr and "Traceback" not in result.stderr
    assert not os.path.exists(marker) and not out.exists()
    assert elapsed < 60, elapsed

    assert generate_main([checkpoint, "--prompt", "hello"]) == 2
    assert f"error: {expected}" in capsys.readouterr().err
    assert not os.path.exists(marker)
