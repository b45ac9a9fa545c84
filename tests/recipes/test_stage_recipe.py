"""The stage recipe composes the parts from their own configs, and never edits the config it was given."""

import copy
import logging

import pytest
import torch

import vitacore
from vitacore.engine import LoopConfig, OptimConfig
from vitacore.model import ModelSpec


def test_dry_run_builds_the_model_and_report_but_no_trainer(vitacore_cache, dist, tmp_path, caplog):
    config = vitacore.parse_args(["--stage", "3", "--dry_run", "--output_dir", str(tmp_path / "out")])
    given = copy.deepcopy(config)
    recipe = vitacore.StageRecipe(config)
    with caplog.at_level(logging.INFO, logger="vitacore"):
        recipe.setup()
    assert recipe.trainer is None and "dry run: nothing trained" in caplog.text
    assert not (tmp_path / "out").exists()  # nothing written by a dry run
    assert config == given and config.field_sources == given.field_sources
    # The preset and the model-type inference are recorded on the recipe's own copy.
    assert recipe.config.source_of("learning_rate") == "embedded-default demo setting"
    assert recipe.config.source_of("version") != "default"
    assert recipe.report["units"]["llm"]["trainable"] == recipe.report["units"]["llm"]["total"] > 0


def test_each_part_gets_its_own_typed_config(vitacore_cache, dist, tmp_path):
    config = vitacore.parse_args(["--stage", "1", "--output_dir", str(tmp_path), "--max_steps", "3",
                                  "--learning_rate", "2e-3", "--seed", "5", "--save_total_limit", "2"])
    recipe = vitacore.StageRecipe(config)
    recipe.build_parts()
    specs = recipe.specs
    assert isinstance(specs.model, ModelSpec) and isinstance(specs.loop, LoopConfig)
    assert isinstance(specs.optim, OptimConfig)
    assert (specs.loop.max_steps, specs.loop.seed, specs.loop.progress_label) == (3, 5, "stage 1")
    assert specs.optim.learning_rate == 2e-3 and specs.model.seed == 5 and specs.data.seed == 5
    assert (specs.checkpoint.output_dir, specs.checkpoint.save_total_limit) == (str(tmp_path), 2)
    assert specs.model.llm_path == recipe.assets.llm and specs.model.dtype == torch.float32
    assert specs.data.bundled.train == (recipe.assets.subset("image"),)  # stage 1's synthetic images
    assert recipe.checkpointer.output_dir == str(tmp_path)
    assert [g["lr"] for g in recipe.param_groups] == [2e-3, 2e-3]  # the projector's decay / no-decay groups


def test_a_trainable_state_head_is_refused_before_any_data_is_read(vitacore_cache, dist, tmp_path):
    config = vitacore.parse_args(["--stage", "fo", "--audio_state_predictor_tuning", "True",
                                  "--output_dir", str(tmp_path)])
    recipe = vitacore.StageRecipe(config)
    with pytest.raises(ValueError, match="--audio_state_predictor_tuning True: the state head needs per-turn"):
        recipe.build_parts()
    assert recipe.model.state_head is not None and recipe.model.state_head.weight.requires_grad
    assert not hasattr(recipe, "data")
