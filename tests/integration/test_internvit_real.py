"""InternViT laid out as released (module-level ``timm`` import, no ``post_init()``), trained by stage runs.

The tower (``tests/model/internvit_real``, written by ``tiny_models.write_real_internvit``) is what
plain transformers cannot load here; vitacore's loader must. Stage 1 then stage 3 (which trains the
tower; VITA's ``finetune_qwen.sh`` preset sets ``unfreeze_vision_tower``) run with ``--vision_tower
DIR`` on the embedded default's tiny LLM and synthetic data, in one process and under two-process
ZeRO-3, and stage 3's full export must reload with the trained model's logits.
"""

import copy
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_distributed import env_for, free_port
from tiny_models import write_real_internvit

import vitacore
from vitacore.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from vitacore.data.dataset import Collator, Sample
from vitacore.model.remote_code import DropPath
from vitacore.recipes import build_model_from_config, recipe_main

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(REPO, "examples", "train_stage.py")
DRIVER = os.path.join(REPO, "tests", "integration", "internvit_real_driver.py")
ZERO3 = os.path.join(REPO, "configs", "zero3.json")
STEPS = 3
# Small and quick: three steps of two samples. The LR is raised so that stage 3's tower, at VITA's
# tower LR (mm_projector_lr), moves visibly; the rest of each preset stays VITA's.
COMMON = ["--max_steps", str(STEPS), "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1",
          "--logging_steps", "1", "--learning_rate", "1e-3", "--mm_projector_lr", "1e-3", "--model_max_length", "512"]


@pytest.fixture(scope="module")
def tower(tmp_path_factory):
    """A tiny tower in InternViT-300M-448px's layout: 28 px images, 7 px patches (a 4×4 grid), width 16."""
    return write_real_internvit(tmp_path_factory.mktemp("released") / "InternViT-300M-448px")


def stage_flags(stage, tower, out, *extra):
    # The tower is remote code: every run gives its consent.
    return ["--stage", stage, "--vision_tower", tower, "--trust_remote_code", "True", "--output_dir", str(out), *COMMON,
            *extra]


def unit(state, prefix):
    return {k: v for k, v in state.items() if k.startswith(prefix)}


def assert_stage1(losses, trainable, before, after, out, tower):
    """Stage 1 started from the tower folder's weights and trained the projector alone: it moved, the
    tower did not, and mm_projector.bin holds it."""
    stored = load_file(os.path.join(tower, "model.safetensors"))
    assert {f"vision_tower.encoder.{k}" for k in stored} == set(unit(before, "vision_tower."))
    assert all(torch.equal(before[f"vision_tower.encoder.{k}"], v.float()) for k, v in stored.items())
    assert len(losses) == STEPS and all(math.isfinite(x) and x > 0 for x in losses), losses
    assert trainable and all(name.startswith("mm_projector.") for name in trainable)
    assert all(not torch.equal(before[k], after[k]) for k in unit(after, "mm_projector."))
    tower_after = unit(after, "vision_tower.")
    assert tower_after and all(torch.equal(before[k], v) for k, v in tower_after.items())
    saved = torch.load(os.path.join(out, "mm_projector.bin"), weights_only=True)
    assert {k.removeprefix("model.") for k in saved} == set(unit(after, "mm_projector."))
    assert all(torch.equal(v, after[k.removeprefix("model.")]) for k, v in saved.items())


def assert_stage3(losses, trainable, before, after, stage1_after):
    """Stage 3 started from stage 1's projector and trained the LLM, the projector and the tower."""
    assert len(losses) == STEPS and all(math.isfinite(x) and x > 0 for x in losses), losses
    assert {name.split(".")[0] for name in trainable} == {"llm", "vision_tower", "mm_projector"}
    assert all(torch.equal(before[k], v) for k, v in unit(stage1_after, "mm_projector.").items())
    changed = [k for k in unit(after, "vision_tower.") if not torch.equal(before[k], after[k])]
    assert sorted(changed) == sorted(unit(after, "vision_tower.")), "every tower tensor is trained"
    assert "vision_tower.encoder.encoder.layers.1.attn.qkv.weight" in changed


def image_batch(model, count=2):
    """A collated batch of ``count`` samples, each with one image (28 px, the tower's size) among text tokens."""
    generator = torch.Generator().manual_seed(5)
    samples = []
    for index in range(count):
        text = torch.randint(3, model.llm.config.vocab_size, (12,), generator=generator).tolist()
        ids = text[:3] + [IMAGE_TOKEN_INDEX] + text[3:]
        image = torch.randn(3, 28, 28, generator=generator)
        samples.append(Sample(f"img{index}", ids, [IGNORE_INDEX] * 4 + ids[4:], [image], [], [], "image"))
    batch = Collator(pad_token_id=0)(samples)
    batch.pop("sample_ids", None)
    return batch


def logits(model, batch):
    model.eval()
    model.loss_chunk_size = 0  # the full-logits path, which returns the logits
    with torch.no_grad():
        return model(**batch)["logits"]


def assert_export_reloads(out, trained, batch):
    """The run's full export (bfloat16, the default) reloads, through its own vision_tower/ folder and
    without timm, to the trained model cast to bfloat16: equal tensors, equal logits."""
    assert sorted(os.listdir(os.path.join(out, "vision_tower"))) == [
        "config.json", "configuration_intern_vit.py", "modeling_intern_vit.py", "preprocessor_config.json"]
    reloaded = vitacore.load_full_export(str(out), dtype=torch.bfloat16, trust_remote_code=True).model
    encoder = reloaded.vision_tower.encoder
    assert type(encoder).__name__ == "InternVisionModel" and isinstance(encoder.encoder.layers[1].drop_path1, DropPath)
    cast = copy.deepcopy(trained)
    for param in cast.parameters():  # as from_pretrained(dtype=bf16) casts: parameters only
        param.data = param.data.to(torch.bfloat16)
    expected = dict(cast.named_parameters())
    got = dict(reloaded.named_parameters())
    assert set(got) == set(expected) and all(torch.equal(got[k], v) for k, v in expected.items())
    assert torch.equal(logits(reloaded, batch), logits(cast, batch))
    assert importlib.util.find_spec("timm") is None and "timm" not in sys.modules


def train_in_process(flags):
    recipe = vitacore.StageRecipe(vitacore.parse_args(flags))
    recipe.build_parts()
    recipe.data.eval = None  # a few steps; no final evaluation
    before = {n: p.detach().clone() for n, p in recipe.model.named_parameters()}
    result = recipe.build_trainer().fit()
    recipe.cleanup(result)
    after = {n: p.detach().clone() for n, p in recipe.model.named_parameters()}
    trainable = sorted(n for n, p in recipe.model.named_parameters() if p.requires_grad)
    return recipe, [r["loss"] for r in result.rows if "loss" in r], trainable, before, after


def test_stages_1_and_3_in_one_process(tower, dist, vitacore_cache, tmp_path):
    s1, s3 = tmp_path / "s1", tmp_path / "s3"
    recipe, losses, trainable, before, after = train_in_process(stage_flags("1", tower, s1))
    assert isinstance(recipe.model.vision_tower.encoder.encoder.layers[1].drop_path2, DropPath)  # timm stood in
    assert_stage1(losses, trainable, before, after, s1, tower)
    stage1_after = after

    recipe, losses, trainable, before, after = train_in_process(
        stage_flags("3", tower, s3, "--pretrain_mm_mlp_adapter", str(s1 / "mm_projector.bin")))
    assert_stage3(losses, trainable, before, after, stage1_after)
    assert_export_reloads(s3, recipe.model, image_batch(recipe.model))


def test_stages_1_and_3_under_two_process_zero3(tower, vitacore_cache, tmp_path):
    s1, s3, dump = tmp_path / "s1", tmp_path / "s3", str(tmp_path / "dump")
    zero3 = ["--deepspeed", ZERO3]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), DRIVER, dump, *stage_flags("1", tower, s1, *zero3), "--then",
           *stage_flags("3", tower, s3, *zero3, "--pretrain_mm_mlp_adapter", str(s1 / "mm_projector.bin"))]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env_for(vitacore_cache), timeout=600, cwd=REPO)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    for stage in (0, 1):
        ranks = [json.load(open(f"{dump}.{stage}.rank{rank}.json")) for rank in (0, 1)]
        assert [r["world_size"] for r in ranks] == [2, 2] and ranks[0]["losses"] == ranks[1]["losses"]
        assert all(all(r["partitioned"]) and r["partitioned"] for r in ranks)  # the tower was built partitioned
    first, second = (json.load(open(f"{dump}.{stage}.rank0.json")) for stage in (0, 1))
    stage1 = torch.load(f"{dump}.0.pt", weights_only=True)
    stage3 = torch.load(f"{dump}.1.pt", weights_only=True)
    assert_stage1(first["losses"], first["trainable"], stage1["before"], stage1["after"], s1, tower)
    assert_stage3(second["losses"], second["trainable"], stage3["before"], stage3["after"], stage1["after"])

    # The trained model, rebuilt here from the same flags and the gathered trained weights.
    config = vitacore.parse_args(stage_flags("3", tower, tmp_path / "rebuild", "--pretrain_mm_mlp_adapter",
                                             str(s1 / "mm_projector.bin")))
    trained = build_model_from_config(config)[0].model
    missing, unexpected = trained.load_state_dict(stage3["after"], strict=False)
    assert not unexpected and not set(missing) & set(dict(trained.named_parameters()))
    assert_export_reloads(s3, trained, image_batch(trained))


def test_a_broken_tower_folder_is_an_error_message_naming_it(tower, vitacore_cache, tmp_path, capsys):
    """The entry point reports a tower that does not load as one line naming the folder, not a traceback."""
    syntax = tmp_path / "syntax_error"
    shutil.copytree(tower, syntax)
    with open(syntax / "modeling_intern_vit.py", "a") as fh:
        fh.write("\nclass Broken(:\n")
    result = subprocess.run([sys.executable, SCRIPT, *stage_flags("1", str(syntax), tmp_path / "out")],
                            capture_output=True, text=True, env=env_for(vitacore_cache), timeout=300, cwd=REPO)
    assert result.returncode == 2, result.stderr[-3000:]
    assert f"error: --vision_tower {str(syntax)!r}: the tower does not load (" in result.stderr
    assert "raised SyntaxError" in result.stderr
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout

    missing = tmp_path / "missing_key"
    shutil.copytree(tower, missing)
    weights = load_file(str(missing / "model.safetensors"))
    del weights["encoder.layers.0.attn.qkv.weight"]
    save_file(weights, str(missing / "model.safetensors"), metadata={"format": "pt"})
    assert recipe_main(stage_flags("1", str(missing), tmp_path / "out2")) == 2
    err = capsys.readouterr().err
    assert f"error: --vision_tower {str(missing)!r}: the weights have no 'encoder.layers.0.attn.qkv.weight'" in err
    assert "Traceback" not in err
