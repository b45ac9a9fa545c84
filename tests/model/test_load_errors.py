"""A folder that does not load reaches the user as one message naming the flag and the folder."""

import os
import shutil

import pytest

from vitacore.recipes import recipe_main


@pytest.fixture
def demo_parts(vitacore_cache):
    from vitacore.demo import ensure_default_assets

    return ensure_default_assets()


def _truncate(path, size=1000):
    with open(path, "rb") as fh:
        head = fh.read(size)
    with open(path, "wb") as fh:
        fh.write(head)


@pytest.mark.parametrize("flag", ["--model_name_or_path", "--audio_encoder"])
def test_a_truncated_weight_file_is_a_message_not_a_traceback(demo_parts, dist, tmp_path, capsys, flag):
    source = demo_parts.llm if flag == "--model_name_or_path" else demo_parts.audio_encoder
    broken = tmp_path / "broken"
    shutil.copytree(source, broken)
    _truncate(os.path.join(broken, "model.safetensors"))
    code = recipe_main(["--stage", "2", flag, str(broken), "--vision_tower", demo_parts.vision_tower,
                        "--output_dir", str(tmp_path / "run"), "--max_steps", "1"])
    err = capsys.readouterr().err
    assert code != 0
    assert f"{flag} {str(broken)!r}" in err and "does not load" in err and "Traceback" not in err, err
