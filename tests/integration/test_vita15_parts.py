"""VITA-1.5's own parts in real runs: its audio encoder folder (stage 2) and a full checkpoint in its
released layout (stage 4 under 2-process ZeRO-3, exported back with the same keys)."""

import json
import os
import sys

import pytest
import torch
from safetensors import safe_open

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(REPO, "tests"))
sys.path.insert(0, os.path.join(REPO, "tests", "integration"))

from test_distributed import run, torchrun  # noqa: E402
from tiny_families import save_tiny_llm  # noqa: E402
from tiny_models import write_real_internvit  # noqa: E402
from vita15_checkpoint import RECORDED_AUDIO, RECORDED_TOWER, write_vita15_checkpoint  # noqa: E402
from whale_folder import write_vita_audio_encoder  # noqa: E402

from vitacore.recipes import recipe_main  # noqa: E402

SCRIPT = os.path.join(REPO, "examples", "train_stage.py")
# VITA's CNNSubsampling with norm "layer" (whale/adapter.py): conv1d2, bn2 (a LayerNorm), project; its
# audio_adpter.bin holds the named parameters under "model.audio_encoder.adpter.".
VITA_ADAPTER_KEYS = {f"model.audio_encoder.adpter.{name}.{kind}" for name in ("conv1d2", "bn2", "project")
                     for kind in ("weight", "bias")}
DEMO_LLM_HIDDEN = 128


def logged_losses(output_dir):
    with open(os.path.join(output_dir, "metrics.jsonl")) as fh:
        return [row["loss"] for row in map(json.loads, fh) if "loss" in row]


def test_stage2_trains_the_adapter_of_vitas_audio_encoder_folder(vitacore_cache, dist, tmp_path, capsys):
    whale = write_vita_audio_encoder(tmp_path / "audio-encoder", llm_embed_dim=DEMO_LLM_HIDDEN)
    out = tmp_path / "run"
    code = recipe_main(["--stage", "2", "--audio_encoder", whale.path, "--output_dir", str(out), "--max_steps", "40",
                        "--logging_steps", "5"])
    assert code == 0, capsys.readouterr().err
    losses = logged_losses(out)
    assert len(losses) == 8 and losses[-1] < 0.85 * losses[0], losses
    saved = torch.load(out / "audio_adpter.bin", weights_only=True)
    assert set(saved) == VITA_ADAPTER_KEYS
    # It is the folder's adapter that trained: same shapes as final.pt's adpter.*, new values.
    for key, value in saved.items():
        start = whale.state["adpter." + key.split("adpter.", 1)[1]]
        assert value.shape == start.shape and not torch.equal(value, start), key


@pytest.mark.parametrize("damage", ["missing", "mis-shaped"])
def test_a_bad_final_pt_key_stops_the_run_naming_key_and_file(vitacore_cache, dist, tmp_path, capsys, damage):
    key = "encoder.enc.1.encoders.1.feed_forward.w_2.weight"
    if damage == "missing":
        whale = write_vita_audio_encoder(tmp_path / "audio", llm_embed_dim=DEMO_LLM_HIDDEN, drop_keys=(key,))
    else:
        whale = write_vita_audio_encoder(tmp_path / "audio", llm_embed_dim=DEMO_LLM_HIDDEN,
                                         extra_keys={key: torch.zeros(32, 65)})
    code = recipe_main(["--stage", "2", "--audio_encoder", whale.path, "--output_dir", str(tmp_path / "run"),
                        "--max_steps", "1"])
    err = capsys.readouterr().err
    assert code != 0
    assert key in err and whale.checkpoint_path in err and "Traceback" not in err, err


@pytest.fixture(scope="module")
def vita15(tmp_path_factory, vitacore_cache):
    """A VITA-1.5-layout checkpoint on an untied Qwen2 (as Qwen2.5-7B is), its tower and audio folders."""
    root = tmp_path_factory.mktemp("vita15")
    llm = save_tiny_llm(root / "Qwen2.5-7B-Instruct", "qwen2")
    with open(os.path.join(llm, "config.json")) as fh:
        hidden = json.load(fh)["hidden_size"]
    tower = write_real_internvit(root / RECORDED_TOWER)
    audio = write_vita_audio_encoder(root / RECORDED_AUDIO, llm_embed_dim=hidden).path
    shapes = write_vita15_checkpoint(root / "VITA-1.5", llm, tower, audio)
    return {"checkpoint": str(root / "VITA-1.5"), "tower": tower, "audio": audio, "shapes": shapes}


def exported_shapes(directory):
    index = os.path.join(directory, "model.safetensors.index.json")
    files = sorted(set(json.load(open(index))["weight_map"].values())) if os.path.isfile(index) else [
        "model.safetensors"]
    shapes = {}
    for name in files:
        with safe_open(os.path.join(directory, name), "pt") as reader:
            shapes.update({key: tuple(reader.get_slice(key).get_shape()) for key in reader.keys()})  # noqa: SIM118
    return shapes


@pytest.mark.slow
def test_vita15_checkpoint_trains_stage4_under_two_process_zero3_and_exports_its_own_keys(vita15, vitacore_cache,
                                                                                       tmp_path):
    from vitacore.demo import ensure_default_assets

    data = ensure_default_assets().data_root  # the demo's images, clips and texts
    out = tmp_path / "stage4"
    run(torchrun(2, SCRIPT, "--stage", "4", "--model_name_or_path", vita15["checkpoint"],
                 "--vision_tower", vita15["tower"], "--trust_remote_code", "True", "--audio_encoder", vita15["audio"],
                 "--data_path", f"{data}/image.json,{data}/audio.json,{data}/text.json",
                 "--deepspeed", os.path.join(REPO, "configs", "zero3.json"), "--max_steps", "1",
                 "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1",
                 "--model_max_length", "512", "--output_dir", str(out)), vitacore_cache)
    assert exported_shapes(str(out)) == vita15["shapes"]
    with open(out / "config.json") as fh:
        config = json.load(fh)
    # The encoders recorded are the folders the run used; their configs travel with the export.
    assert os.path.isfile(out / "audio_encoder" / "train.yaml") and os.path.isfile(out / "vision_tower" / "config.json")
    assert config["mm_projector_type"] == "mlp2x_gelu" and config["audio_prompt_num"] == 4
