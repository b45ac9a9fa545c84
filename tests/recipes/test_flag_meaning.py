"""Flags mean what they mean in VITA: no silent stage preset or demo part for a real LLM, refusals
that name the flag, and notes for flags accepted without effect."""

import json

import pytest
import torch
from tiny_families import save_tiny_llm

from vitacore.config import ignored_flag_notes, parse_args
from vitacore.data import DataSpec, ModelInputs, build_data
from vitacore.demo import ensure_default_assets
from vitacore.demo.tokenizer import build_tokenizer
from vitacore.model import load_vision_tower
from vitacore.recipes import StageRecipe, recipe_main, resolve_stage
from vitacore.recipes.model import check_select_layer
from vitacore.recipes.stages import NO_PRESET


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory):
    """A 1-layer random Qwen2 LLM folder: a "real" --model_name_or_path (built once per module)."""
    return save_tiny_llm(tmp_path_factory.mktemp("tiny_qwen2"), "qwen2")


@pytest.fixture(scope="module")
def default_tower(vitacore_cache):
    """The embedded default's SigLIP-style vision tower folder (its select layer is -2)."""
    return ensure_default_assets().vision_tower


def _dry_recipe(tmp_path, *flags: str) -> StageRecipe:
    """A StageRecipe for ``flags`` with its parts built under ``--dry_run`` (no data, no trainer)."""
    recipe = StageRecipe(parse_args([*flags, "--dry_run", "True", "--output_dir", str(tmp_path / "out")]))
    recipe.build_parts()
    return recipe


# 1. --stage defaults to None; a real LLM without --stage gets no preset.


def test_stage_defaults_to_none():
    config = parse_args([])
    assert config.stage is None and not config.is_explicit("stage")


def test_a_real_llm_without_stage_gets_no_preset(tiny_llm):
    preset, resolved = resolve_stage(parse_args(["--model_name_or_path", tiny_llm]), embedded_default=False)
    assert preset is NO_PRESET and preset.key == "none" and resolved.stage == "none"
    # Stage 1's preset would have turned these on (tune_mm_mlp_adapter True, learning_rate 5e-4).
    assert resolved.model.tune_mm_mlp_adapter is False
    assert resolved.training.learning_rate == 5e-5 and resolved.source_of("learning_rate") == "default"
    flagged = parse_args(["--model_name_or_path", tiny_llm, "--learning_rate", "1e-3"])
    assert resolve_stage(flagged, embedded_default=False)[1].training.learning_rate == 1e-3


def test_without_model_name_or_path_the_stage_is_the_demo_stage_1():
    preset, resolved = resolve_stage(parse_args([]), embedded_default=True)
    assert preset.key == "1" and resolved.stage == "1" and resolved.model.tune_mm_mlp_adapter is True


def test_stage_none_parses_as_the_none_stage():
    config = parse_args(["--stage", "none"])
    assert config.stage == "none" and config.is_explicit("stage")


@pytest.mark.parametrize("llm_flags", [[], ["--model_name_or_path", "some/llm"]], ids=["embedded", "real_llm"])
def test_stage_none_is_no_preset(llm_flags):
    config = parse_args([*llm_flags, "--stage", "none"])
    preset, resolved = resolve_stage(config, embedded_default=not llm_flags)
    assert preset is NO_PRESET and resolved.stage == "none"
    assert resolved.model.tune_mm_mlp_adapter is False


def test_stage_3_with_a_real_llm_applies_the_preset(tiny_llm):
    preset, resolved = resolve_stage(parse_args(["--model_name_or_path", tiny_llm, "--stage", "3"]),
                                     embedded_default=False)
    assert preset.key == "3" and resolved.stage == "3"
    assert resolved.training.learning_rate == 2e-5 and resolved.model.unfreeze_vision_tower is True
    assert resolved.source_of("learning_rate").startswith("stage 3 preset")


def test_dry_run_says_no_stage_preset_applies(dist, tiny_llm, default_tower, vitacore_log, tmp_path):
    argv = ["--model_name_or_path", tiny_llm, "--vision_tower", default_tower, "--dry_run", "True",
            "--output_dir", str(tmp_path / "out")]
    assert recipe_main(argv) == 0
    assert "no stage preset (--model_name_or_path given without --stage)" in vitacore_log.text


def test_dry_run_with_stage_none_says_so(dist, tiny_llm, default_tower, vitacore_log, tmp_path):
    argv = ["--model_name_or_path", tiny_llm, "--vision_tower", default_tower, "--stage", "none", "--dry_run",
            "True", "--output_dir", str(tmp_path / "out")]
    assert recipe_main(argv) == 0
    assert "no stage preset (--stage none)" in vitacore_log.text


# 2. A real-LLM run never takes a demo part.


@pytest.mark.parametrize("extra", [[], ["--freeze_mm_mlp_adapter", "True"]], ids=["default_flags", "frozen_proj"])
def test_a_real_llm_alone_builds_only_the_llm(dist, tiny_llm, vitacore_log, tmp_path, extra):
    text = tmp_path / "text.json"  # a dry run reads the data: text, as the model has no encoder
    text.write_text(json.dumps([{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}]))
    recipe = _dry_recipe(tmp_path, "--model_name_or_path", tiny_llm, "--data_path", str(text), *extra)
    model = recipe.model
    assert (model.vision_tower, model.mm_projector, model.audio_encoder, model.audio_adapter) == (None,) * 4
    assert list(recipe.report["units"]) == ["llm"]
    assert all(name.startswith("llm.") for name in recipe.report["trainable_names"])
    assert "no vision_tower (--vision_tower not given)" in vitacore_log.text
    assert "no audio_encoder (--audio_encoder not given)" in vitacore_log.text
    spec = recipe.specs.model  # no stand-in part from the embedded default
    assert (spec.llm_path, spec.vision_tower_path, spec.audio_encoder_path) == (tiny_llm, None, None)


def test_a_real_llm_with_a_vision_tower_has_no_audio(dist, tiny_llm, default_tower, vitacore_log, tmp_path):
    recipe = _dry_recipe(tmp_path, "--model_name_or_path", tiny_llm, "--vision_tower", default_tower)
    model = recipe.model
    assert model.vision_tower is not None and model.mm_projector is not None
    assert model.audio_encoder is None and model.audio_adapter is None
    assert set(recipe.report["units"]) == {"llm", "vision_tower", "mm_projector"}
    assert "no audio_encoder (--audio_encoder not given)" in vitacore_log.text
    assert "no vision_tower" not in vitacore_log.text


# 3. Data needing a missing encoder is refused when the data is built, naming the flag.


@pytest.mark.parametrize("field, token, flag", [("image", "<image>", "--vision_tower"),
                                                ("video", "<video>", "--vision_tower"),
                                                ("audio", "<audio>", "--audio_encoder")])
def test_data_needing_a_missing_encoder_is_refused(tmp_path, field, token, flag):
    text = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}
    media = {field: f"x.{field}", "conversations": [{"from": "human", "value": f"{token}\nwhat is it?"},
                                                    {"from": "gpt", "value": "a thing"}]}
    path = tmp_path / "train.json"
    path.write_text(json.dumps([text, media]))
    with pytest.raises(ValueError, match=flag) as err:
        build_data(DataSpec(data_path=str(path)), build_tokenizer(), ModelInputs())
    assert f"{path}, record 1" in str(err.value) and f"field '{field}'" in str(err.value)


def test_text_only_data_builds_without_encoders(tmp_path):
    path = tmp_path / "train.json"
    path.write_text(json.dumps([{"conversations": [{"from": "human", "value": "hi"},
                                                   {"from": "gpt", "value": "hello"}]}]))
    assert len(build_data(DataSpec(data_path=str(path)), build_tokenizer(), ModelInputs()).train) == 1


# 4. A projector checkpoint with no tower to put it on.


def test_pretrain_mm_mlp_adapter_without_a_tower_is_refused(dist, tiny_llm, tmp_path):
    adapter = tmp_path / "mm_projector.bin"
    torch.save({"model.mm_projector.0.weight": torch.zeros(32, 8), "model.mm_projector.0.bias": torch.zeros(32),
                "model.mm_projector.2.weight": torch.zeros(32, 32), "model.mm_projector.2.bias": torch.zeros(32)},
               adapter)
    with pytest.raises(ValueError, match="has no vision tower") as err:
        _dry_recipe(tmp_path, "--model_name_or_path", tiny_llm, "--pretrain_mm_mlp_adapter", str(adapter))
    assert "--pretrain_mm_mlp_adapter" in str(err.value) and str(adapter) in str(err.value)


# 5. LLaVA's flags: accepted with VITA's meaning, refused otherwise.


@pytest.mark.parametrize("flag", ["mm_use_im_start_end", "mm_use_im_patch_token"])
def test_llava_token_flags_accept_only_false(flag):
    with pytest.raises(ValueError, match=f"--{flag} True: LLaVA's .* supports only False"):
        parse_args([f"--{flag}", "True"])
    assert parse_args([f"--{flag}", "False"]).get(flag) is False


def test_is_multimodal_false_is_refused():
    with pytest.raises(ValueError, match="--is_multimodal False: VITA's text-only mode"):
        parse_args(["--is_multimodal", "False"])
    assert parse_args(["--is_multimodal", "True"]).data.is_multimodal is True


def test_check_select_layer_takes_only_the_towers_layer(default_tower):
    tower = load_vision_tower(default_tower)
    assert tower.select_layer == -2
    num_states = tower.encoder.config.num_hidden_layers + 1
    for same in (None, -2, num_states - 2):  # a positive index of the same hidden state is the same layer
        check_select_layer(same, tower)
    check_select_layer(-1, None)  # no tower: nothing to check
    for other in (-1, 0, num_states, -num_states - 1):
        with pytest.raises(ValueError, match=f"--mm_vision_select_layer {other}: vitacore takes layer -2"):
            check_select_layer(other, tower)


def test_select_layer_in_a_dry_run(dist, vitacore_cache, tmp_path, capsys):
    argv = ["--stage", "1", "--dry_run", "True", "--output_dir", str(tmp_path / "out")]
    assert recipe_main([*argv, "--mm_vision_select_layer", "-2"]) == 0
    capsys.readouterr()
    assert recipe_main([*argv, "--mm_vision_select_layer", "-1"]) == 2
    err = capsys.readouterr().err
    assert "error: --mm_vision_select_layer -1: vitacore takes layer -2" in err and "pass -2" in err


# 6. Flags accepted without effect are listed as notes.


def test_ignored_flags_get_one_note_each():
    config = parse_args(["--lazy_preprocess", "True", "--cache_dir", "/x", "--remove_unused_columns", "False",
                         "--double_quant", "True"])
    notes = ignored_flag_notes(config)
    assert len(notes) == 4
    for flag in ("--lazy_preprocess", "--cache_dir", "--remove_unused_columns", "--double_quant"):
        assert sum(note.startswith(f"{flag} has no effect") for note in notes) == 1
    assert ignored_flag_notes(parse_args([])) == []
    assert ignored_flag_notes(parse_args(["--bits", "4", "--lora_enable", "True", "--double_quant", "True"])) == []


def test_dry_run_notes_an_ignored_flag(dist, vitacore_cache, vitacore_log, tmp_path):
    argv = ["--stage", "1", "--dry_run", "True", "--lazy_preprocess", "True", "--output_dir", str(tmp_path / "out")]
    assert recipe_main(argv) == 0
    assert "note: --lazy_preprocess has no effect" in vitacore_log.text


# 7. --report_json into a folder that does not exist yet.


def test_report_json_creates_its_folder(dist, vitacore_cache, tmp_path):
    report = tmp_path / "not" / "yet" / "report.json"
    argv = ["--stage", "1", "--dry_run", "True", "--report_json", str(report), "--output_dir", str(tmp_path / "out")]
    assert recipe_main(argv) == 0
    assert set(json.loads(report.read_text())["units"]) >= {"llm", "mm_projector"}
