"""Acceptance: VITA-1.5's six Qwen stage scripts, flags pasted verbatim (paths swapped for tiny local folders,
no ``--stage``), train exactly the units VITA's ``vita/train/train.py`` trains with those flags.

Each run is a ``--dry_run`` through ``recipe_main`` with ``--report_json``; the report's trainable units and
param-group learning rates are compared with what VITA does. Line numbers cite VITA-1.5's sources
(``vita/train/train.py`` unless named otherwise).
"""

import json
import os

import pytest
from tiny_families import save_tiny_llm
from tiny_models import write_real_internvit
from vita_scripts import (
    INTERNVIT_PIXEL_SHUFFLE,
    SCRIPTS,
    script_argv,
    write_registry,
    write_vita_projector,
    write_zero3,
)
from whale_folder import write_vita_audio_encoder

from vitacore.recipes import recipe_main

# What VITA trains with each script's flags. Common ground, in VITA's code order:
#   - a plain model trains everything: from_pretrained leaves requires_grad on, and the projector is built new
#     (vita_arch.py:56-57) or re-enabled (vita_arch.py:59-61);
#   - the vision tower freezes itself when built (internvit_encoder.py:30, siglip_encoder.py:26/106:
#     self.vision_tower.requires_grad_(False));
#   - the audio encoder and its adapter freeze from freeze_audio_encoder / freeze_audio_encoder_adapter, written
#     to the config at train.py:354-355 and read by build_audio_encoder (multimodal_encoder/builder.py:53-58,
#     whale/init_model.py:109-116); prompt embeddings exist only with audio_prompt_finetune (init_model.py:118-119);
#   - then the switches: tune_mm_mlp_adapter (train.py:380-383), tune_audio_mlp_adapter (388-391),
#     audio_prompt_finetune / audio_state_predictor_tuning (399-406) each freeze the whole model first
#     (model.requires_grad_(False)) and re-enable their part; freeze_mm_mlp_adapter (409-411);
#     unfreeze_vision_tower (423-425).
EXPECTED_UNITS = {
    # --tune_mm_mlp_adapter True: train.py:380-383 freezes all, re-enables model.get_model().mm_projector.
    "pretrain_mlp_qwen": {"mm_projector"},
    # --tune_mm_mlp_adapter False (380 skipped); --freeze_audio_encoder_adapter False leaves the adapter trainable
    # (builder.py:56-58, init_model.py:113-116); --tune_audio_mlp_adapter True: train.py:388-391 freezes all, then
    # re-enables model.model.audio_encoder.adpter only.
    "pretrain_audio_mlp_qwen": {"audio_adapter"},
    # No tune_* switch: LLM and projector stay trainable (vita_arch.py:56-61); --unfreeze_vision_tower True:
    # train.py:423-425 re-enables the tower frozen at internvit_encoder.py:30. Audio frozen (builder.py:53-58).
    "finetune_qwen": {"llm", "mm_projector", "vision_tower"},
    # No switch at all: LLM + projector (vita_arch.py:56-61); tower frozen (internvit_encoder.py:30), audio encoder
    # and adapter frozen by --freeze_audio_encoder(_adapter) True (builder.py:53-58, init_model.py:109-116).
    "finetuneTask_qwen": {"llm", "mm_projector"},
    # As finetuneTask, plus --freeze_audio_encoder_adapter False: the adapter keeps requires_grad
    # (train.py:355 -> builder.py:56-58 -> init_model.py:113-116); no tune_* switch re-freezes it.
    "finetuneTaskNeg_qwen": {"llm", "mm_projector", "audio_adapter"},
    # --audio_prompt_finetune True: train.py:399-403 freezes all and re-enables
    # model.model.audio_encoder.prompt_embeddings (25 of them, init_model.py:118-119);
    # --audio_state_predictor_tuning False skips 404-406 (no state head trains).
    "finetuneTaskNeg_qwen_fo": {"audio_prompt"},
}

# Each trained unit's learning rate: the script's --learning_rate (HF's optimizer default for VITATrainer's
# groups without "lr", vita_trainer.py:205-229). finetune_qwen's --mm_projector_lr 2e-6 goes to parameters whose
# name holds "vision_tower" only in VITA-1.5 (vita_trainer.py:198-204 and 241; the "mm_projector" test is
# commented out at 202). vitacore gives the projector mm_projector_lr too (a documented difference), so the
# projector's LR is not asserted there.
EXPECTED_LR = {
    "pretrain_mlp_qwen": {"mm_projector": 5e-4},
    "pretrain_audio_mlp_qwen": {"audio_adapter": 5e-4},
    "finetune_qwen": {"llm": 2e-5, "vision_tower": 2e-6},
    "finetuneTask_qwen": {"llm": 2e-5, "mm_projector": 2e-5},
    "finetuneTaskNeg_qwen": {"llm": 2e-5, "mm_projector": 2e-5, "audio_adapter": 2e-5},
    "finetuneTaskNeg_qwen_fo": {"audio_prompt": 1e-4},
}
NO_PRESET = "no stage preset"


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory, vitacore_cache):
    """Tiny local folders for every path the scripts name, built once for the module."""
    from vitacore.demo import ensure_default_assets

    root = tmp_path_factory.mktemp("vita_scripts")
    qwen = save_tiny_llm(root / "Qwen2.5-7B-Instruct", "qwen2")
    with open(os.path.join(qwen, "config.json")) as fh:
        qwen_hidden = json.load(fh)["hidden_size"]
    paths = {
        "qwen": qwen,
        "siglip": ensure_default_assets().vision_tower,  # a SigLIP-style tower (siglip-so400m-patch14-384)
        # VITA-1.5's own parts, laid out as released: InternViT's remote code, VITA's audio encoder folder.
        "internvit": write_real_internvit(root / "InternViT-300M-448px"),
        "audio": write_vita_audio_encoder(root / "audio-encoder-Qwen2-7B-1107-weight-base-11wh-tunning",
                                          llm_embed_dim=qwen_hidden).path,
        "zero3": write_zero3(root / "zero3.json"),
        "registry": write_registry(root / "data"),
    }
    paths["mm_projector"] = write_vita_projector(root / "mm_projector.bin", paths["internvit"], paths["qwen"],
                                                 tower_factor=INTERNVIT_PIXEL_SHUFFLE)
    return paths


def _dry_run(script, stand_ins, tmp_path, capsys, vitacore_log):
    argv = script_argv(script, stand_ins, tmp_path)
    code = recipe_main(argv)
    err = capsys.readouterr().err
    assert code == 0, f"{script}: VITA's flags were refused (exit {code}): {err.strip()}"
    log = vitacore_log.text
    assert "dry run: nothing trained" in log, "the vitacore log was not captured"
    with open(os.path.join(str(tmp_path), "report.json")) as fh:
        return json.load(fh), log


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_vita_script_trains_what_vita_trains(script, stand_ins, dist, tmp_path, capsys, vitacore_log):
    report, log = _dry_run(script, stand_ins, tmp_path, capsys, vitacore_log)
    trained = {unit for unit, counts in report["units"].items() if counts["trainable"] > 0}
    problems = []
    if trained != EXPECTED_UNITS[script]:
        problems.append(f"trains {sorted(trained)}, VITA trains {sorted(EXPECTED_UNITS[script])}")
    for group in report["param_groups"]:
        if group["num_params"] == 0:
            continue
        for unit in group["units"]:
            lr = EXPECTED_LR[script].get(unit)
            if lr is not None and group["lr"] != pytest.approx(lr):
                problems.append(f"{unit}'s group has lr {group['lr']}, VITA's flags give {lr}")
        if group["weight_decay"] != 0.0:  # --weight_decay 0. in every script
            problems.append(f"group {group['units']} has weight decay {group['weight_decay']}, the flags say 0.")
    grouped = {unit for group in report["param_groups"] if group["num_params"] for unit in group["units"]}
    missing = set(EXPECTED_LR[script]) - grouped
    if missing:
        problems.append(f"no param group holds {sorted(missing)}")
    if NO_PRESET not in log:
        problems.append(f"the log never says {NO_PRESET!r} (without --stage the flags alone decide)")
    assert not problems, f"{script}:\n  " + "\n  ".join(problems)
