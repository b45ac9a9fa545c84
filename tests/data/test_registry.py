"""Tests for the dataset registry, simple mode, record validation and a training run from a registry."""

import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest

from vitacore.config import ConfigError, parse_args
from vitacore.data.audio import AudioTransform, write_wav
from vitacore.data.conversation import QWEN2P5_INSTRUCT
from vitacore.data.dataset import VitaJsonDataset
from vitacore.data.images import ImageTransform
from vitacore.data.records import load_records
from vitacore.data.registry import load_registry, load_sources, sources_from_config
from vitacore.demo.synthetic import SAMPLE_RATE, draw_shape, tone
from vitacore.demo.tokenizer import build_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _conv(question, answer="ok"):
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


def _write_json(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records, indent=1))
    return path


def _png(folder, name, colour="red", shape="circle"):
    folder.mkdir(parents=True, exist_ok=True)
    draw_shape(random.Random(name), colour, shape, 32).save(folder / name)
    return name


def _gif(folder, name, frames=4):
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(name)
    images = [draw_shape(rng, "blue", "square", 32, centre=(8 + 4 * k, 16)) for k in range(frames)]
    images[0].save(folder / name, save_all=True, append_images=images[1:], duration=333, loop=0)
    return name


def _wav(folder, name, pitch="low"):
    folder.mkdir(parents=True, exist_ok=True)
    write_wav(str(folder / name), tone(random.Random(name), pitch, seconds=0.5), SAMPLE_RATE)
    return name


def _all_kinds(root):
    """A registry folder whose records cover image (two sets and no set), multiple images, video,
    audio, text-only and an ``inserted_id`` record; returns the registry path."""
    _png(root / "images_a", "a.png")
    _png(root / "images_b", "b1.png", "green", "square")
    _png(root / "images_b", "b2.png", "yellow", "triangle")
    _png(root / "misc", "plain.png", "blue")
    _gif(root / "videos", "clip.gif")
    _wav(root / "audio", "tone.wav")
    _wav(root / "audio", "noise.wav", "high")
    records = [
        {"id": "img-a", "set": "set_a", "image": "a.png",
         "conversations": _conv("<image>\nWhat is shown?", "a red circle")},
        {"id": "imgs-b", "set": "set_b", "image": ["b1.png", "b2.png"],
         "conversations": _conv("<image>\n<image>\nWhat are these?", "a green square and a yellow triangle")},
        {"id": "img-plain", "image": "plain.png", "conversations": _conv("<image>\nColour?", "blue")},
        {"id": "vid", "video": "clip.gif", "conversations": _conv("<video>\nWhat happens?", "a square moves right")},
        {"id": "aud", "audio": ["tone.wav"], "conversations": _conv("<audio>\nWhat do you hear?", "a low tone")},
        {"id": "txt", "conversations": _conv("Repeat: red circle", "red circle")},
        {"id": "neg", "set": "set_a", "image": "a.png", "audio": ["noise.wav"], "inserted_id": 3, "end_tag": True,
         "conversations": _conv("<image>\nWhat is shown?", "a red circle") + _conv("<audio>", "")},
    ]
    _write_json(root / "json" / "all.json", records)
    text = [{"id": f"t{i}", "conversations": _conv(f"Say {i}", str(i))} for i in range(10)]
    _write_json(root / "json" / "text.json", text)
    registry = root / "datasets.yaml"
    registry.write_text(
        "all_kinds:\n"
        "  - chat_path: json/all.json\n"
        "    set_a: images_a\n"
        "    set_b: images_b\n"
        "    image_folder: misc\n"
        "    audio_folder: audio\n"
        "    video_folder: videos\n"
        "text_half:\n"
        "  - chat_path: json/text.json\n"
        "    data_ratio: 0.5\n")
    return registry


def _data(*flags):
    return parse_args(list(flags)).data


# ---- registry ----------------------------------------------------------------------------------
def test_registry_resolves_sets_and_folders_relative_to_the_yaml(tmp_path):
    registry = _all_kinds(tmp_path / "reg")
    root = str(tmp_path / "reg")
    sources = sources_from_config(_data("--data_registry", str(registry), "--dataset_use", "all_kinds"))
    assert len(sources) == 1 and sources[0].set_folders == {"set_a": os.path.join(root, "images_a"),
                                                            "set_b": os.path.join(root, "images_b")}
    records, origins, _ = load_sources(sources, seed=42)
    by_id = {r["id"]: r for r in records}
    assert by_id["img-a"]["image"] == os.path.join(root, "images_a", "a.png")
    assert by_id["imgs-b"]["image"] == [os.path.join(root, "images_b", n) for n in ("b1.png", "b2.png")]
    assert by_id["img-plain"]["image"] == os.path.join(root, "misc", "plain.png")
    assert by_id["vid"]["video"] == os.path.join(root, "videos", "clip.gif")
    assert by_id["aud"]["audio"] == [os.path.join(root, "audio", "tone.wav")]
    assert all(os.path.exists(p) for r in records for k in ("image", "audio", "video")
               for p in ([r[k]] if isinstance(r.get(k), str) else r.get(k) or []))
    assert origins[1] == f"{os.path.join(root, 'json', 'all.json')}, record 1"
    # The file's records are untouched (paths resolved on copies).
    assert load_records(str(tmp_path / "reg" / "json" / "all.json"))[0]["image"] == "a.png"


def test_data_ratio_is_seeded_and_keeps_file_order(tmp_path):
    registry = str(_all_kinds(tmp_path / "reg"))
    sources = sources_from_config(_data("--data_registry", registry, "--dataset_use", "all_kinds,text_half"))
    assert [s.data_ratio for s in sources] == [1.0, 0.5]
    records, _, _ = load_sources(sources, seed=42)
    kept = [r["id"] for r in records[7:]]
    assert len(records) == 7 + 5 and kept == sorted(kept, key=lambda i: int(i[1:]))
    assert [r["id"] for r in load_sources(sources, seed=42)[0]] == [r["id"] for r in records]
    others = {tuple(r["id"] for r in load_sources(sources, seed=s)[0][7:]) for s in range(8)}
    assert len(others) > 1  # the seed picks the subset


def test_simple_mode_with_folder_flags(tmp_path):
    _all_kinds(tmp_path / "reg")
    json_a = str(tmp_path / "reg" / "json" / "all.json")
    json_b = str(tmp_path / "reg" / "json" / "text.json")
    sources = sources_from_config(_data("--data_path", f"{json_a},{json_b}",
                                        "--image_folder", str(tmp_path / "reg" / "misc"),
                                        "--audio_folder", str(tmp_path / "reg" / "audio"),
                                        "--video_folder", str(tmp_path / "reg" / "videos")))
    records, _, _ = load_sources(sources, seed=0)
    assert len(records) == 17
    by_id = {r["id"]: r for r in records}
    # Without a set map every image is in --image_folder, 'set' or not.
    assert by_id["img-a"]["image"] == str(tmp_path / "reg" / "misc" / "a.png")
    assert by_id["aud"]["audio"] == [str(tmp_path / "reg" / "audio" / "tone.wav")]
    assert by_id["vid"]["video"] == str(tmp_path / "reg" / "videos" / "clip.gif")


def test_simple_mode_defaults_media_to_the_json_folder(tmp_path):
    path = _write_json(tmp_path / "d" / "x.json", [{"image": "p.png", "conversations": _conv("<image>")}])
    records, _, _ = load_sources(sources_from_config(_data("--data_path", str(path))), seed=0)
    assert records[0]["image"] == str(tmp_path / "d" / "p.png")


def test_no_data_flags_means_embedded_data():
    assert sources_from_config(_data()) is None


# ---- registry and flag errors ------------------------------------------------------------------
def test_unknown_dataset_name_lists_known(tmp_path):
    registry = str(_all_kinds(tmp_path / "reg"))
    with pytest.raises(ValueError) as err:
        sources_from_config(_data("--data_registry", registry, "--dataset_use", "all_kind"))
    message = str(err.value)
    assert "--dataset_use 'all_kind'" in message and "known: all_kinds, text_half" in message
    assert "did you mean 'all_kinds'" in message


def test_both_modes_are_refused_naming_the_flags(tmp_path):
    with pytest.raises(ConfigError) as err:
        parse_args(["--data_path", "a.json", "--dataset_use", "x", "--data_registry", "r.yaml"])
    assert "--data_path conflicts with --dataset_use and --data_registry" in str(err.value)


@pytest.mark.parametrize("flags, expected", [
    (("--dataset_use", "x"), "--dataset_use 'x' needs --data_registry"),
    (("--data_registry", "r.yaml"), "--data_registry r.yaml is given without --dataset_use"),
    (("--data_path", "nothing.json"), "--data_path: data file 'nothing.json' does not exist"),
    (("--data_registry", "nothing.yaml", "--dataset_use", "x"), "--data_registry 'nothing.yaml' does not exist"),
])
def test_flag_errors(tmp_path, monkeypatch, flags, expected):
    monkeypatch.chdir(tmp_path)
    with pytest.raises((ValueError, FileNotFoundError)) as err:
        sources_from_config(_data(*flags))
    assert expected in str(err.value)


@pytest.mark.parametrize("yaml_text, expected", [
    ("mix:\n  - chat_path: missing.json\n", "mix[0].chat_path: data file"),
    ("mix:\n  - chat_path: ok.json\n    sharegpt: no_such_dir\n", "mix[0].sharegpt: folder"),
    ("mix:\n  - data_ratio: 0.5\n", "mix[0] has no 'chat_path'"),
    ("mix:\n  - chat_path: ok.json\n    data_ratio: 1.5\n", "mix[0].data_ratio is 1.5; it must be a number in (0, 1]"),
    ("mix:\n  chat_path: ok.json\n", "dataset 'mix' must be a non-empty list"),
    ("mix:\n  - chat_path: [ok.json\n", "not valid YAML at line 3"),
    ("- just a list\n", "expected a mapping of dataset names"),
])
def test_registry_errors_name_file_entry_and_key(tmp_path, yaml_text, expected):
    _write_json(tmp_path / "ok.json", [{"conversations": _conv("q")}])
    registry = tmp_path / "datasets.yaml"
    registry.write_text(yaml_text)
    with pytest.raises((ValueError, FileNotFoundError)) as err:
        load_registry(str(registry))
    assert str(registry) in str(err.value) and expected in str(err.value)


def test_record_with_unmapped_set_is_named(tmp_path):
    (tmp_path / "imgs").mkdir()
    _write_json(tmp_path / "d.json", [{"conversations": _conv("q")},
                                      {"set": "other", "image": "x.png", "conversations": _conv("<image>")}])
    (tmp_path / "r.yaml").write_text("mix:\n  - chat_path: d.json\n    known_set: imgs\n")
    sources = sources_from_config(_data("--data_registry", str(tmp_path / "r.yaml"), "--dataset_use", "mix"))
    records, _, rejected = load_sources(sources, seed=0)
    assert len(records) == 1 and [r.index for r in rejected] == [1]
    message = rejected[0].message
    assert "d.json, record 1" in message and "field 'set' is 'other'" in message and "known sets: known_set" in message


# ---- record validation -------------------------------------------------------------------------
def test_malformed_json_names_file_and_position(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n {"conversations": [\n  {"from": "human", "value": "hi"},,\n ]}\n]')
    with pytest.raises(ValueError, match=r"bad\.json: malformed JSON at line 3 column \d+"):
        load_records(str(path))


@pytest.mark.parametrize("record, expected", [
    ("not a dict", "is a str"),
    ({"conversations": "hi"}, "field 'conversations' is missing or not a list"),
    ({"conversations": [{"from": "bot", "value": "hi"}]}, "field 'conversations[0]'.from is 'bot'"),
    ({"conversations": [{"from": "human", "value": 3}]}, "field 'conversations[0]'.value is int"),
    ({"conversations": ["hi"]}, "field 'conversations[0]' is a str"),
    ({"image": 7, "conversations": _conv("<image>")}, "field 'image' must be a path"),
    ({"audio": ["a.wav", ""], "conversations": _conv("<audio><audio>")}, "field 'audio' must be a path"),
    ({"set": {"a": 1}, "conversations": _conv("q")}, "field 'set' must be a string"),
    ({"inserted_id": 5, "conversations": _conv("q")}, "field 'inserted_id' is 5"),
    ({"inserted_id": 0, "conversations": _conv("q")}, "field 'inserted_id' is 0"),
    ({"end_tag": "yes", "conversations": _conv("q")}, "field 'end_tag' must be true or false"),
    ({"image": ["a.png", "b.png"], "conversations": _conv("<image>")}, "field 'image' lists 2 file(s)"),
    ({"video": "v.gif", "conversations": _conv("<image>")}, "field 'image' lists 0 file(s)"),
    ({"video": "v.gif", "image": "a.png", "conversations": _conv("<image>")}, "field 'video' lists 1 file(s)"),
    ({"conversations": _conv("<audio>")}, "field 'audio' lists 0 file(s) but the conversations hold 1 <audio>"),
])
def test_bad_record_names_file_index_and_field(tmp_path, record, expected):
    path = _write_json(tmp_path / "records.json", [{"id": "fine", "conversations": _conv("q")}, record])
    with pytest.raises(ValueError) as err:
        load_records(str(path))
    message = str(err.value)
    assert message.startswith(f"{path}: record 1") and expected in message


def test_valid_records_of_every_kind_load(tmp_path):
    registry = _all_kinds(tmp_path / "reg")
    assert len(load_records(str(registry.parent / "json" / "all.json"))) == 7


def test_sample_errors_name_the_source_file_and_record(tmp_path):
    registry = _all_kinds(tmp_path / "reg")
    os.remove(tmp_path / "reg" / "images_b" / "b2.png")
    sources = sources_from_config(_data("--data_registry", str(registry), "--dataset_use", "text_half,all_kinds"))
    records, origins, _ = load_sources(sources, seed=1)
    dataset = VitaJsonDataset(records, "/nonexistent", build_tokenizer(), QWEN2P5_INSTRUCT,
                              ImageTransform(16, (0.5,) * 3, (0.5,) * 3), AudioTransform(), origins=origins)
    for index in range(len(dataset)):
        if records[index]["id"] != "imgs-b":
            assert len(dataset[index].input_ids) > 0  # every other kind loads
    with pytest.raises(ValueError, match="missing image file") as err:  # a bad sample, strict by default
        dataset[6]
    assert "all.json, record 1 (id 'imgs-b')" in str(err.value) and "b2.png" in str(err.value)


# ---- acceptance 4: training from a registry with every media kind ------------------------------
@pytest.mark.slow
def test_training_run_from_a_registry_with_all_media_kinds(tmp_path, vitacore_cache):
    registry = _all_kinds(tmp_path / "reg")
    # Eval media are relative to the eval JSON's folder, whatever the training registry says.
    held_out = tmp_path / "held_out"
    eval_json = _write_json(held_out / "eval.json", [
        {"id": "ev-img", "image": _png(held_out, "e.png"), "conversations": _conv("<image>\nShown?", "a circle")},
        {"id": "ev-aud", "audio": _wav(held_out, "e.wav"), "conversations": _conv("<audio>\nHeard?", "a tone")}])
    out = tmp_path / "run"
    # Not this session's launcher variables: a `dist` fixture may hold MASTER_PORT in this process.
    launcher = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"}
    env = {**{k: v for k, v in os.environ.items() if k not in launcher},
           "VITACORE_CACHE": vitacore_cache, "DS_ACCELERATOR": "cpu"}
    cmd = [sys.executable, os.path.join(REPO, "examples", "train_stage.py"), "--stage", "4",
           "--data_registry", str(registry), "--dataset_use", "all_kinds,text_half", "--max_steps", "4",
           "--save_strategy", "no", "--output_dir", str(out), "--per_device_train_batch_size", "2",
           "--logging_steps", "1", "--dataloader_num_workers", "0", "--eval_data_path", str(eval_json)]
    proc = subprocess.run(cmd, cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    losses = [row["loss"] for row in rows if "loss" in row]
    assert losses and all(np.isfinite(losses))
    assert max(row["step"] for row in rows) == 4
    assert any(np.isfinite(row.get("eval_loss", np.nan)) for row in rows)


def test_packed_records_give_each_image_its_own_set(tmp_path):
    """VITA's packed records list one ``set`` per image (then per video)."""
    from vitacore.data.registry import DataSource, load_source

    chat = tmp_path / "packed.json"
    conversation = [{"from": "human", "value": "<image><image> compare"}, {"from": "gpt", "value": "same"}]
    records = [{"set": ["a", "b"], "image": ["1.png", "2.png"], "conversations": conversation},
               {"set": ["a", "a", "a"], "image": ["1.png", "2.png"], "conversations": conversation},
               {"set": ["a", "b", "a"], "image": ["1.png", "2.png"], "conversations": conversation}]
    chat.write_text(json.dumps(records[:2]))
    source = DataSource(str(chat), "test", set_folders={"a": str(tmp_path / "A"), "b": str(tmp_path / "B")})
    loaded, _, _ = load_source(source, seed=0)
    assert loaded[0]["image"] == [str(tmp_path / "A" / "1.png"), str(tmp_path / "B" / "2.png")]
    assert loaded[1]["image"] == [str(tmp_path / "A" / "1.png"), str(tmp_path / "A" / "2.png")]
    chat.write_text(json.dumps(records[2:]))
    _, _, rejected = load_source(source, seed=0)
    assert "field 'set' lists 3 names for 2 image(s)" in rejected[0].message


def test_records_with_unmapped_sets_are_dropped_and_the_rest_keep_their_origins(tmp_path):
    (tmp_path / "imgs").mkdir()
    bad = {"set": "other", "image": "x.png", "conversations": _conv("<image>")}
    _write_json(tmp_path / "d.json", [{"id": "a", "conversations": _conv("q")}, bad, bad,
                                      {"id": "b", "conversations": _conv("q")}])
    (tmp_path / "r.yaml").write_text("mix:\n  - chat_path: d.json\n    known_set: imgs\n")
    sources = sources_from_config(_data("--data_registry", str(tmp_path / "r.yaml"), "--dataset_use", "mix"))
    records, origins, rejected = load_sources(sources, seed=0)
    assert [r["id"] for r in records] == ["a", "b"] and [r.index for r in rejected] == [1, 2]
    assert [o.rsplit(", ", 1)[1] for o in origins] == ["record 0", "record 3"]
