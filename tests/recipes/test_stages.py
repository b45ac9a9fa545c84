"""Stage presets: config defaults, the policy they lead to, overrides, user stages (no DeepSpeed)."""

import copy
import os

import pytest
import torch
from tiny_models import build_tiny_vita

from vitacore.config import parse_args
from vitacore.freeze import policy_from_config
from vitacore.model.multimodal import UNIT_PREFIXES
from vitacore.recipes.stages import BUILTIN_PRESETS, describe_sources, get_preset, load_stage_file, resolve_stage

EXPECTED_UNITS = {
    "1": {"mm_projector"},
    "2": {"audio_adapter"},
    "3": {"llm", "mm_projector", "vision_tower"},
    "4": {"llm", "mm_projector"},
    "neg": {"llm", "mm_projector", "audio_adapter"},
    "fo": {"audio_prompt"},
}
EXPECTED_LR = {"1": 5e-4, "2": 5e-4, "3": 2e-5, "4": 2e-5, "neg": 2e-5, "fo": 1e-4}


def staged(argv, embedded=False):
    preset, cfg = resolve_stage(parse_args(argv), embedded_default=embedded)
    return cfg, preset


@pytest.mark.parametrize("stage", sorted(EXPECTED_UNITS))
def test_every_preset_trains_its_units(stage):
    cfg, preset = staged(["--stage", stage])
    assert set(policy_from_config(cfg).trained_units()) == EXPECTED_UNITS[stage]
    assert cfg.training.learning_rate == EXPECTED_LR[stage]
    assert cfg.training.lr_scheduler_type == "cosine" and cfg.training.warmup_ratio == 0.03
    assert cfg.source_of("learning_rate").startswith(f"stage {preset.key} preset")


@pytest.mark.parametrize("stage", sorted(EXPECTED_UNITS))
def test_every_preset_on_a_meta_model_sets_requires_grad_exactly(stage):
    cfg, _ = staged(["--stage", stage])
    policy = policy_from_config(cfg)
    with torch.device("meta"):
        model = build_tiny_vita(audio_prompt_num=2, state_head=True)
    policy.apply(model, UNIT_PREFIXES)
    for name, param in model.named_parameters():
        unit = next(u for u, prefixes in UNIT_PREFIXES.items() if name.startswith(prefixes))
        assert param.requires_grad == (unit in EXPECTED_UNITS[stage]), name
    assert "llm" not in model.eval_units
    assert set(model.eval_units) == set(UNIT_PREFIXES) - EXPECTED_UNITS[stage] - {"llm"}


@pytest.mark.parametrize("alias, key", [(p.name, p.key) for p in BUILTIN_PRESETS])
def test_aliases_resolve_to_keys(alias, key):
    cfg, preset = staged(["--stage", alias])
    assert preset.key == key and cfg.stage == key


def test_vita_stage_lengths_and_batches():
    assert staged(["--stage", "4"])[0].training.model_max_length == 33300
    assert staged(["--stage", "4"])[0].training.per_device_train_batch_size == 1
    cfg, _ = staged(["--stage", "3"])
    assert cfg.training.mm_projector_lr == 2e-6 and cfg.model.unfreeze_vision_tower
    assert staged(["--stage", "fo"])[0].model.audio_prompt_num == 25
    assert staged(["--stage", "fo"])[0].model.model_type == "qwen2p5_fo_instruct"


def test_explicit_flags_win_over_the_preset_and_are_reported():
    cfg, _ = staged(["--stage", "3", "--learning_rate", "1e-5", "--per_device_train_batch_size", "2"])
    assert cfg.training.learning_rate == 1e-5 and cfg.source_of("learning_rate") == "flag"
    assert cfg.training.per_device_train_batch_size == 2
    text = describe_sources(cfg)
    assert "flag: " in text and "learning_rate=1e-05" in text and "stage 3 preset (finetune_qwen.sh)" in text


def test_flags_add_units_to_a_preset():
    cfg, _ = staged(["--stage", "1", "--unfreeze_vision_tower", "True"])
    assert set(policy_from_config(cfg).trained_units()) == {"mm_projector", "vision_tower"}


def test_stage1_with_projector_frozen_names_both_flags():
    cfg, _ = staged(["--stage", "1", "--freeze_mm_mlp_adapter", "True"])
    with pytest.raises(ValueError) as err:
        policy_from_config(cfg)
    assert "--tune_mm_mlp_adapter" in str(err.value) and "--freeze_mm_mlp_adapter" in str(err.value)


def test_yaml_values_also_win_over_the_preset(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("stage: '2'\ntraining:\n  learning_rate: 7.0e-4\n")
    cfg, preset = staged(["--config", str(path)])
    assert preset.key == "2" and cfg.training.learning_rate == 7e-4 and cfg.source_of("learning_rate") == "yaml"


def test_embedded_default_uses_demo_settings():
    cfg, _ = staged([], embedded=True)
    assert cfg.training.learning_rate == 3e-3 and cfg.training.max_steps == 600
    assert cfg.source_of("max_steps") == "embedded-default demo setting"
    assert cfg.training.output_dir == "output/demo-stage-1"
    # The parsed config is left as it was: the preset's values go into the returned copy only.
    parsed = parse_args([])
    before, sources_before = copy.deepcopy(parsed), dict(parsed.field_sources)
    _, resolved = resolve_stage(parsed, embedded_default=True)
    assert resolved is not parsed and resolved.training.max_steps == 600
    assert parsed == before and parsed.field_sources == sources_before
    assert parsed.training.max_steps == -1 and parsed.training.output_dir == "output"
    assert parsed.source_of("max_steps") == "default"


def test_demo_stage_picks_up_an_earlier_stage_output(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    os.makedirs("output/demo-stage-1")
    open("output/demo-stage-1/mm_projector.bin", "wb").close()
    cfg, _ = staged(["--stage", "3"], embedded=True)
    assert cfg.model.pretrain_mm_mlp_adapter == "output/demo-stage-1/mm_projector.bin"
    assert cfg.source_of("pretrain_mm_mlp_adapter") == "stage 1 demo output"
    cfg, _ = staged(["--stage", "3", "--pretrain_mm_mlp_adapter", "mine.bin"], embedded=True)
    assert cfg.model.pretrain_mm_mlp_adapter == "mine.bin"


def test_unknown_stage_lists_the_known_ones():
    with pytest.raises(ValueError) as err:
        get_preset("7")
    message = str(err.value)
    assert "--stage '7'" in message and all(p.key in message for p in BUILTIN_PRESETS)


def test_user_stage_from_yaml(tmp_path):
    path = tmp_path / "stages.yaml"
    path.write_text(
        "stages:\n"
        "  tower_only:\n"
        "    trains: the vision tower\n"
        "    defaults:\n"
        "      freeze_backbone: true\n      freeze_mm_mlp_adapter: true\n      unfreeze_vision_tower: true\n"
        "      learning_rate: 1.0e-5\n"
        "  finetune_no_tower:\n"
        "    base: '3'\n"
        "    defaults:\n      unfreeze_vision_tower: false\n")
    cfg, preset = staged(["--stage", "tower_only", "--stage_file", str(path)])
    assert preset.key == "tower_only" and preset.trains == "the vision tower"
    assert set(policy_from_config(cfg).trained_units()) == {"vision_tower"}
    assert cfg.training.learning_rate == 1e-5
    cfg, preset = staged(["--stage", "finetune_no_tower", "--stage_file", str(path)])
    assert set(policy_from_config(cfg).trained_units()) == {"llm", "mm_projector"}
    assert cfg.training.mm_projector_lr == 2e-6  # inherited from stage 3


@pytest.mark.parametrize("body, needle", [
    ("bad:\n  base: '9'\n", "not a built-in stage"),
    ("bad:\n  defualts: {}\n", "unknown keys"),
    ("- a\n- b\n", "mapping"),
    ("bad: [unclosed\n", "not valid YAML"),
])
def test_bad_stage_files_name_the_file(tmp_path, body, needle):
    path = tmp_path / "stages.yaml"
    path.write_text(body)
    with pytest.raises(ValueError) as err:
        load_stage_file(str(path))
    assert needle in str(err.value) and str(path) in str(err.value)


def test_missing_stage_file():
    with pytest.raises(FileNotFoundError, match="--stage_file"):
        load_stage_file("/no/such/stages.yaml")
