"""Tests for vitacore.demo.synthetic: determinism and answers that match the media."""

import json
import os
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from vitacore.data.audio import AudioTransform, load_wav
from vitacore.data.conversation import QWEN2P5_INSTRUCT
from vitacore.data.dataset import VitaJsonDataset, load_video_frames
from vitacore.data.images import ImageTransform
from vitacore.data.video import VIDEO_MIN_FRAMES
from vitacore.demo.synthetic import (
    COLOURS,
    DIRECTIONS,
    SAMPLE_RATE,
    SHAPES,
    TONES,
    SyntheticSizes,
    generate,
    text_warmup_records,
)
from vitacore.demo.tokenizer import build_tokenizer

SIZES = SyntheticSizes(num_image=6, num_video=3, num_audio=6, num_text=6, num_neg=3, num_eval_image=6,
                       num_eval_audio=4, image_size=64, num_video_frames=3)
SUBSETS = ("image", "video", "audio", "text", "neg", "eval_image", "eval_audio")


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic_a")
    paths = generate(str(root), seed=3, sizes=SIZES)
    records = {name: json.loads(open(path).read()) for name, path in paths.items()}
    return root, paths, records


def _tree(root):
    """{relative path: bytes} of every file under root."""
    out = {}
    for folder, _, files in os.walk(root):
        for name in files:
            full = os.path.join(folder, name)
            with open(full, "rb") as fh:
                out[os.path.relpath(full, root)] = fh.read()
    return out


def _shape_pixels(image):
    """Pixels that are not the grey background (the background has r == g == b)."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.int32)
    mask = ~((pixels[..., 0] == pixels[..., 1]) & (pixels[..., 1] == pixels[..., 2]))
    return pixels, mask


def _nearest_colour(rgb):
    return min(COLOURS, key=lambda name: sum((a - b) ** 2 for a, b in zip(rgb, COLOURS[name])))


def _classify_shape(mask):
    rows, cols = np.nonzero(mask)
    box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
    fill = mask.sum() / box  # square ~1, circle ~pi/4, triangle ~1/2
    if fill > 0.92:
        return "square"
    if fill > 0.65:
        return "circle"
    return "triangle"


def test_generate_writes_every_subset(generated):
    root, paths, records = generated
    assert set(paths) == set(SUBSETS)
    expected_counts = {"image": 6, "video": 3, "audio": 6, "text": 6, "neg": 3, "eval_image": 6, "eval_audio": 4}
    assert {name: len(recs) for name, recs in records.items()} == expected_counts
    for name, recs in records.items():
        ids = [r["id"] for r in recs]
        assert len(set(ids)) == len(ids), name
        for record in recs:
            for key in ("image", "video"):
                if key in record:
                    assert os.path.isfile(os.path.join(root, record[key])), record["id"]
            for rel in record.get("audio", []):
                assert os.path.isfile(os.path.join(root, rel)), record["id"]


def test_same_seed_gives_identical_files(generated, tmp_path):
    root, _, _ = generated
    generate(str(tmp_path), seed=3, sizes=SIZES)
    first, second = _tree(root), _tree(tmp_path)
    assert set(first) == set(second)
    for rel in first:
        assert first[rel] == second[rel], rel


def test_different_seed_gives_different_data(generated, tmp_path):
    root, _, _ = generated
    generate(str(tmp_path), seed=4, sizes=SIZES)
    first, second = _tree(root), _tree(tmp_path)
    assert set(first) == set(second)  # same names ...
    differing = [rel for rel in first if first[rel] != second[rel]]
    assert any(rel.endswith(".png") for rel in differing)
    assert any(rel.endswith(".wav") for rel in differing)
    assert "image.json" in differing or "audio.json" in differing


@pytest.mark.parametrize("subset", ["image", "eval_image", "neg"])
def test_image_answers_name_the_drawn_colour_and_shape(generated, subset):
    root, _, records = generated
    for record in records[subset]:
        answer = record["conversations"][1]["value"]
        _, colour, shape = answer.split()
        assert colour in COLOURS and shape in SHAPES
        pixels, mask = _shape_pixels(Image.open(os.path.join(root, record["image"])))
        assert mask.sum() > 50, record["id"]
        dominant = Counter(map(tuple, pixels[mask].tolist())).most_common(1)[0][0]
        assert _nearest_colour(dominant) == colour, (record["id"], dominant)
        assert _classify_shape(mask) == shape, record["id"]


def test_video_answers_name_colour_and_direction(generated):
    root, _, records = generated
    for record in records["video"]:
        _, colour, shape, moving, direction = record["conversations"][1]["value"].split()
        assert moving == "moving" and direction in DIRECTIONS
        assert record["conversations"][0]["value"].startswith("<video>")
        frames = load_video_frames(os.path.join(root, record["video"]))
        # 3 fps GIFs: every frame is a sampling position; VITA stretches fewer than 4 to 4, repeating some.
        assert len(frames) == max(VIDEO_MIN_FRAMES, SIZES.num_video_frames)
        centres = []
        for frame in frames:
            pixels, mask = _shape_pixels(frame)
            dominant = Counter(map(tuple, pixels[mask].tolist())).most_common(1)[0][0]
            assert _nearest_colour(dominant) == colour
            centres.append(np.nonzero(mask)[1].mean())
        moves = [b - a for a, b in zip(centres, centres[1:]) if b != a]  # a repeated frame does not move
        assert len(moves) == SIZES.num_video_frames - 1, (record["id"], centres)
        assert all(m < 0 for m in moves) if direction == "left" else all(m > 0 for m in moves), (record["id"], centres)


def _dominant_frequency(path):
    samples = load_wav(path, target_sample_rate=SAMPLE_RATE).numpy()
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(len(samples))))
    freqs = np.fft.rfftfreq(len(samples), 1.0 / SAMPLE_RATE)
    return freqs[np.argmax(spectrum)]


@pytest.mark.parametrize("subset", ["audio", "eval_audio"])
def test_tone_answers_name_the_pitch_heard(generated, subset):
    root, _, records = generated
    for record in records[subset]:
        _, pitch, _ = record["conversations"][1]["value"].split()
        assert pitch in TONES
        (rel,) = record["audio"]
        freq = _dominant_frequency(os.path.join(root, rel))
        assert abs(freq - TONES[pitch]) / TONES[pitch] < 0.06, (record["id"], freq, pitch)


def test_eval_images_are_disjoint_from_training_images(generated):
    root, _, records = generated
    train, held = records["image"], records["eval_image"]
    assert not {r["id"] for r in train} & {r["id"] for r in held}
    assert not {r["image"] for r in train} & {r["image"] for r in held}
    train_bytes = {open(os.path.join(root, r["image"]), "rb").read() for r in train}
    assert not any(open(os.path.join(root, r["image"]), "rb").read() in train_bytes for r in held)


def test_eval_audio_is_disjoint_from_training_audio(generated):
    root, _, records = generated
    train, held = records["audio"], records["eval_audio"]
    assert not {r["id"] for r in train} & {r["id"] for r in held}
    train_paths = {p for r in train for p in r["audio"]}
    assert not train_paths & {p for r in held for p in r["audio"]}
    train_bytes = {open(os.path.join(root, p), "rb").read() for p in train_paths}
    assert not any(open(os.path.join(root, p), "rb").read() in train_bytes for r in held for p in r["audio"])


def test_neg_records_insert_at_a_gpt_turn(generated):
    _, _, records = generated
    for record in records["neg"]:
        conv = record["conversations"]
        index = record["inserted_id"]
        assert 0 <= index < len(conv)
        assert conv[index]["from"] == "gpt"
        assert "<audio>" in conv[index - 1]["value"]
        assert len(record["audio"]) == 1 and record["image"]


def test_generated_records_load_through_the_dataset(generated):
    root, _, records = generated
    tok = build_tokenizer()
    every = [r for name in SUBSETS for r in records[name]]
    ds = VitaJsonDataset(every, str(root), tok, QWEN2P5_INSTRUCT, ImageTransform(32, (0.5,) * 3, (0.5,) * 3),
                         AudioTransform())
    for i in range(len(ds)):
        sample = ds[i]
        assert len(sample.input_ids) == len(sample.labels)
    neg = ds[len(every) - SIZES.num_eval_image - SIZES.num_eval_audio - 1]
    assert neg.sample_id.startswith("neg")
    assert tok.convert_tokens_to_ids("☟") in neg.labels


def test_text_warmup_records_are_deterministic():
    assert text_warmup_records(5, 40) == text_warmup_records(5, 40)
    assert text_warmup_records(5, 40) != text_warmup_records(6, 40)
    assert len(text_warmup_records(1, 13)) == 13


def test_text_warmup_questions_contain_the_answer_words():
    records = text_warmup_records(11, 200)
    modalities = Counter()
    for record in records:
        question, answer = (turn["value"] for turn in record["conversations"])
        assert [turn["from"] for turn in record["conversations"]] == ["human", "gpt"]
        assert "<image>" not in question and "<audio>" not in question and "<video>" not in question
        content = [w for w in answer.split() if w not in ("a", "moving")]
        assert content, record
        question_words = question.split()
        for word in content:
            assert word in question_words, (word, question)
        modalities[record["modality"]] += 1
    assert set(modalities) == {"image", "video", "audio", "lang"}
