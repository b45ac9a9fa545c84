"""Config numbers are finite and in range, data and registry files that are not UTF-8 or not the expected
JSON / YAML are refused naming file and flag, and ``--dry_run`` refuses what a real start would."""

import json
import time

import pytest

from vitacore.config import parse_args
from vitacore.data import DataSpec, ModelInputs, build_data
from vitacore.demo.tokenizer import build_tokenizer


@pytest.mark.parametrize("flag,value,expected", [
    ("max_image_pixels", "0", "--max_image_pixels 0 must be >= 1"),
    ("max_images_per_record", "0", "--max_images_per_record 0 must be >= 1"),
    ("max_tiles_per_record", "-3", "--max_tiles_per_record -3 must be >= 1"),
    ("max_video_frames_decoded", "0", "--max_video_frames_decoded 0 must be >= 1"),
    ("max_animation_frames", "0", "--max_animation_frames 0 must be >= 1"),
    ("max_audio_sample_rate", "0", "--max_audio_sample_rate 0 must be >= 1"),
    ("max_audio_seconds", "0", "--max_audio_seconds 0.0 must be > 0"),
    ("min_samples_for_bad_ratio", "-1", "--min_samples_for_bad_ratio -1 must be >= 0"),
])
def test_limits_out_of_range_are_refused_naming_the_flag(flag, value, expected):
    """Setup: a new limit flag at 0 or below. Expect: ValueError at parse naming the flag (before: accepted)."""
    with pytest.raises(ValueError, match=expected):
        parse_args([f"--{flag}", value])


@pytest.mark.parametrize("flag,value", [
    ("num_train_epochs", "inf"), ("num_train_epochs", "-1"), ("adam_epsilon", "0"), ("adam_epsilon", "-1e-8"),
    ("learning_rate", "nan"), ("vision_tower_lr", "inf"), ("lora_dropout", "nan"), ("adam_beta1", "1"),
    ("max_audio_seconds", "inf"),
])
def test_non_finite_or_out_of_range_numbers_are_refused(flag, value):
    """Setup: a number flag non-finite or out of range. Expect: ValueError at parse naming the flag."""
    with pytest.raises(ValueError, match=f"--{flag} "):
        parse_args([f"--{flag}", value])


# Malformed files ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


RECORD = {"conversations": [{"from": "human", "value": "café?"}, {"from": "gpt", "value": "oui"}]}


@pytest.mark.parametrize("case,content,expected", [
    ("latin1", json.dumps([RECORD], ensure_ascii=False).encode("latin-1"), "not UTF-8 text"),
    ("truncated", json.dumps([RECORD, RECORD]).encode()[:-20], "malformed JSON at line 1"),
    ("object", json.dumps({"records": [RECORD]}).encode(), "expected a JSON list of records .* got a JSON object"),
])
def test_a_malformed_data_file_names_the_file_and_the_flag(tmp_path, tok, case, content, expected):
    """Setup: --data_path to a Latin-1 file, a truncated JSON file, a JSON object instead of a list.
    Expect: ValueError starting '--data_path <file>: ...' (before: the Latin-1 file gave a bare codec
    error with no file, the others named no flag)."""
    path = tmp_path / "train.json"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=f"^--data_path {path}: {expected}"):
        build_data(DataSpec(data_path=str(path)), tok, ModelInputs())


def test_a_registry_entry_file_that_is_not_utf8_names_the_entry(tmp_path, tok):
    """Setup: a registry whose chat_path is Latin-1, and a Latin-1 registry YAML.
    Expect: the first names '--data_registry <yaml>: mix[0].chat_path' and the file; the second names
    --data_registry and the YAML (before: bare codec errors)."""
    (tmp_path / "train.json").write_bytes(json.dumps([RECORD], ensure_ascii=False).encode("latin-1"))
    registry = tmp_path / "datasets.yaml"
    registry.write_text("mix:\n  - chat_path: train.json\n")
    with pytest.raises(ValueError, match=rf"--data_registry {registry}: mix\[0\]\.chat_path .*train.json: not UTF-8"):
        build_data(DataSpec(dataset_use="mix", data_registry=str(registry)), tok, ModelInputs())
    registry.write_bytes("mix:  # café\n  - chat_path: train.json\n".encode("latin-1"))
    with pytest.raises(ValueError, match=f"--data_registry {registry}: not UTF-8 text"):
        build_data(DataSpec(dataset_use="mix", data_registry=str(registry)), tok, ModelInputs())


def test_system_prompts_that_are_not_utf8_name_the_flag(tmp_path, tok):
    """Setup: a Latin-1 --system_prompts YAML. Expect: ValueError naming --system_prompts and the file."""
    prompts = tmp_path / "prompts.yaml"
    prompts.write_bytes("lang: Réponds.\n".encode("latin-1"))
    data = tmp_path / "train.json"
    data.write_text(json.dumps([RECORD]))
    with pytest.raises(ValueError, match=f"--system_prompts {prompts}: not UTF-8 text"):
        build_data(DataSpec(data_path=str(data), system_prompts=str(prompts)), tok, ModelInputs())


# --dry_run ----------------------------------------------------------------------------------------------


def _dry_run(tmp_path, *flags):
    from vitacore.recipes import recipe_main

    out = tmp_path / "out"
    started = time.monotonic()
    code = recipe_main(["--dry_run", "True", "--output_dir", str(out), *flags])
    return code, time.monotonic() - started, out


def test_dry_run_validates_the_records(tmp_path, vitacore_cache, capsys):
    """Setup: --dry_run with a data file whose record 1 has an unknown role, --on_bad_sample error.
    Expect: exit 2 naming file, record and field, no checkpoint written (before: exit 0, the data unread)."""
    bad = {"conversations": [{"from": "user", "value": "a"}, {"from": "gpt", "value": "b"}]}
    data = tmp_path / "train.json"
    data.write_text(json.dumps([RECORD, bad]))
    code, elapsed, out = _dry_run(tmp_path, "--data_path", str(data), "--on_bad_sample", "error")
    err = capsys.readouterr().err
    assert code == 2 and f"{data}: record 1" in err and "conversations[0]'.from" in err, err
    assert not list(out.glob("checkpoint-*")) and elapsed < 60


def test_dry_run_checks_the_deepspeed_config(tmp_path, vitacore_cache, capsys):
    """Setup: --dry_run with a --deepspeed file whose zero_optimization has a key DeepSpeed does not know.
    Expect: exit 2 naming --deepspeed and the key (before: exit 0; the real start failed in deepspeed.initialize)."""
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 0, "overlap_gradz": True}}))
    code, elapsed, out = _dry_run(tmp_path, "--deepspeed", str(ds))
    err = capsys.readouterr().err
    assert code == 2 and f"--deepspeed {ds}" in err and "overlap_gradz" in err, err
    assert not list(out.glob("checkpoint-*")) and elapsed < 60
