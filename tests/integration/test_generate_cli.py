"""``python -m vitacore.generate``: a trained demo answers held-out questions; ``--eval_generate`` scores it."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import vitacore
from vitacore.data import PromptDataset, question_record
from vitacore.recipes.inference import load_trained_run, main, prompt_dataset

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(REPO, "tests", "integration"))

from test_distributed import env_for, torchrun  # noqa: E402

COLOURS = ("red", "green", "blue", "yellow")
SHAPES = ("circle", "square", "triangle")
NUM_ASKED = 8  # held-out images asked through the CLI per model


def train(flags, dist):
    """A stage run in this process, as ``examples/train_stage.py`` runs it: setup, fit, final artifacts."""
    recipe = vitacore.StageRecipe(vitacore.parse_args(flags)).setup()
    result = recipe.train()
    recipe.cleanup(result)
    return recipe, result


def held_out(vitacore_cache, count=NUM_ASKED):
    """The first held-out image records: (image path, question, answer, record)."""
    root = vitacore.ensure_default_assets().data_root
    records = json.load(open(os.path.join(root, "eval_image.json")))[:count]
    return [(os.path.join(root, r["image"]), r["conversations"][0]["value"].replace("<image>\n", ""),
             r["conversations"][1]["value"], r) for r in records]


def ask(folder, image, question, capsys):
    """The CLI's exit code, printed answer and stderr."""
    code = main([str(folder), "--image", image, "--prompt", question])
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    return code, lines[-1] if lines else "", captured.err


def assert_names_the_images(folder, vitacore_cache, capsys, least=NUM_ASKED - 1):
    right = 0
    for image, question, answer, _ in held_out(vitacore_cache):
        code, printed, err = ask(folder, image, question, capsys)
        assert code == 0, err
        words = printed.split()
        assert len(words) == 3 and words[0] == "a" and words[1] in COLOURS and words[2] in SHAPES, printed
        right += printed == answer
        print(f"{os.path.basename(image)}: {printed!r} (reference {answer!r})")
    assert right >= least, f"{right} of {NUM_ASKED} held-out images named right by {folder}"


@pytest.fixture(scope="module")
def stage1(vitacore_cache, dist, tmp_path_factory):
    """Demo stage 1 at its defaults (600 steps), evaluating generated answers too."""
    out = tmp_path_factory.mktemp("gen") / "stage1"
    recipe, result = train(["--output_dir", str(out), "--eval_generate", "True"], dist)
    return out, recipe, result


@pytest.mark.slow
def test_eval_generate_scores_the_generated_answers(stage1):
    out, _, result = stage1
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    final = [r for r in rows if "eval_loss" in r][-1]
    print(f"final eval row: {final}")
    assert final["eval_generate_exact_match"] >= 0.9 and final["eval_generate_f1"] >= 0.9, final
    assert final["eval_generate_f1"] >= final["eval_generate_exact_match"]
    assert result.final_eval["eval_generate_exact_match"] == final["eval_generate_exact_match"]


@pytest.mark.slow
def test_the_cli_names_colour_and_shape_of_held_out_images(stage1, vitacore_cache, capsys):
    out, _, _ = stage1
    assert (out / "mm_projector.bin").exists() and (out / "config.yaml").exists()
    assert_names_the_images(out, vitacore_cache, capsys)


@pytest.mark.slow
def test_the_cli_prompt_is_the_eval_sets_prompt(stage1, vitacore_cache):
    """The question asked on the command line becomes the same ids and pixels as the eval record's prompt."""
    out, recipe, _ = stage1
    evaluated = PromptDataset(recipe.data.eval)
    run = load_trained_run(str(out))
    for index, (image, question, _, _) in enumerate(held_out(vitacore_cache, 3)):
        asked = prompt_dataset(run, [question_record(question, [image])])[0]
        assert asked.input_ids == evaluated[index].input_ids
        assert len(asked.images) == len(evaluated[index].images) == 1
        assert torch.equal(asked.images[0], evaluated[index].images[0])


@pytest.mark.slow
def test_the_cli_reads_a_checkpoints_deepspeed_state(stage1, vitacore_cache, capsys):
    out, _, _ = stage1
    image, question, answer, _ = held_out(vitacore_cache, 1)[0]
    code, printed, err = ask(out / "checkpoint-600", image, question, capsys)
    assert code == 0 and printed == answer, (printed, err)
    assert "DeepSpeed state" in err


@pytest.mark.slow
def test_the_cli_answers_from_a_lora_stage4_checkpoint(stage1, vitacore_cache, dist, tmp_path, monkeypatch, capsys):
    out, _, _ = stage1
    monkeypatch.chdir(tmp_path)  # no earlier demo output is picked up; the base LLM is the embedded one
    lora = tmp_path / "lora"
    train(["--stage", "4", "--lora_enable", "True", "--pretrain_mm_mlp_adapter", str(out / "mm_projector.bin"),
           "--max_steps", "40", "--save_steps", "40", "--output_dir", str(lora)], dist)
    checkpoint = lora / "checkpoint-40"
    assert (checkpoint / "adapter_config.json").exists() and (checkpoint / "non_lora_trainables.bin").exists()
    assert_names_the_images(checkpoint, vitacore_cache, capsys)
    _, _, err = ask(checkpoint, *held_out(vitacore_cache, 1)[0][:2], capsys)
    assert "LoRA adapter" in err


@pytest.mark.slow
def test_the_cli_answers_from_a_full_export(stage1, vitacore_cache, dist, tmp_path, monkeypatch, capsys):
    out, _, _ = stage1
    monkeypatch.chdir(tmp_path)
    full = tmp_path / "stage3"
    train(["--stage", "3", "--pretrain_mm_mlp_adapter", str(out / "mm_projector.bin"), "--max_steps", "20",
           "--output_dir", str(full)], dist)
    assert (full / "config.json").exists() and (full / "model.safetensors").exists()
    assert_names_the_images(full, vitacore_cache, capsys)
    _, _, err = ask(full, *held_out(vitacore_cache, 1)[0][:2], capsys)
    assert "full export" in err


def mixed_eval_file(path):
    """41 held-out records alternating image / text-only: with two ranks, rank 0 gets the 21 images and
    rank 1 the 20 texts (its vision tower runs on a dummy image, its share is padded by one)."""
    root = vitacore.ensure_default_assets().data_root
    images = json.load(open(os.path.join(root, "eval_image.json")))[:21]
    texts = json.load(open(os.path.join(root, "text.json")))[:20]
    records = []
    for i, record in enumerate(images):
        records.append({**record, "image": os.path.join(root, record["image"])})
        records += texts[i: i + 1]
    with open(path, "w") as fh:
        json.dump(records, fh)
    return str(path)


@pytest.mark.slow
def test_eval_generate_under_two_process_zero3_matches_one_process(stage1, vitacore_cache, tmp_path):
    out, _, _ = stage1
    eval_file = mixed_eval_file(tmp_path / "mixed.json")
    flags = ["--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "8", "--max_steps", "2",
             "--learning_rate", "1e-7", "--pretrain_mm_mlp_adapter", str(out / "mm_projector.bin"),
             "--eval_data_path", eval_file, "--eval_generate", "True"]
    rows = {}
    for nproc in (1, 2):
        folder = tmp_path / f"o{nproc}"
        extra = ["--deepspeed", os.path.join(REPO, "configs", "zero3.json")] if nproc == 2 else []
        cmd = (torchrun(2, "examples/train_stage.py") if nproc == 2 else [sys.executable, "examples/train_stage.py"])
        result = subprocess.run(cmd + flags + extra + ["--output_dir", str(folder)], capture_output=True, text=True,
                                env=env_for(vitacore_cache), cwd=REPO, timeout=600)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        rows[nproc] = [json.loads(line) for line in open(folder / "metrics.jsonl") if "eval_loss" in line][-1]
        print(f"{nproc} process(es): {rows[nproc]}")
    one, two = rows[1], rows[2]
    assert one["eval_generate_exact_match"] >= 0.9
    # Every record counted once (41, not the 42 the padded share would give): exact match is k / 41.
    assert round(two["eval_generate_exact_match"] * 41, 6) == int(round(two["eval_generate_exact_match"] * 41))
    assert two["eval_generate_exact_match"] == pytest.approx(one["eval_generate_exact_match"])
    assert two["eval_generate_f1"] == pytest.approx(one["eval_generate_f1"])


def test_a_folder_without_config_yaml_is_refused_naming_it(tmp_path, capsys):
    folder = tmp_path / "not-a-run"
    folder.mkdir()
    assert main([str(folder), "--prompt", "What is shown?"]) == 2
    err = capsys.readouterr().err
    assert str(folder) in err and "config.yaml" in err and "Traceback" not in err


def test_a_run_folder_without_weights_is_refused_naming_it(stage1_config, tmp_path, capsys):
    folder = tmp_path / "empty-run"
    folder.mkdir()
    shutil.copy(stage1_config, folder / "config.yaml")
    (folder / "checkpoint-7").mkdir()
    assert main([str(folder), "--prompt", "What is shown?"]) == 2
    err = capsys.readouterr().err
    assert str(folder) in err and "no trained weights" in err and "checkpoint-7" in err


@pytest.fixture
def stage1_config(tmp_path):
    """A run's config.yaml as a stage run writes it (no training needed)."""
    config = vitacore.parse_args(["--output_dir", str(tmp_path / "o")])
    path = tmp_path / "config.yaml"
    config.to_yaml(str(path))
    return path


def test_python_m_vitacore_generate_is_the_entry_point(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    result = subprocess.run([sys.executable, "-m", "vitacore.generate", str(tmp_path), "--prompt", "hi"],
                            capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert result.returncode == 2 and "config.yaml" in result.stderr and str(tmp_path) in result.stderr
