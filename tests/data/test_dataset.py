"""Tests for vitacore.data.dataset: VITA records -> samples -> padded batches."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from vitacore.constants import AUDIO_TOKEN_INDEX, IGNORE_INDEX, IMAGE_TOKEN_INDEX
from vitacore.data.audio import AudioTransform, write_wav
from vitacore.data.conversation import QWEN2P5_INSTRUCT
from vitacore.data.dataset import Collator, VitaJsonDataset, load_records, load_video_frames
from vitacore.data.images import ImageTransform
from vitacore.demo.tokenizer import build_tokenizer

SIZE = 16
MEAN = (0.5, 0.25, 0.125)
STD = (0.5, 0.25, 0.5)
RATE = 16000


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def _png(path, colour, size=(20, 12)):
    Image.new("RGB", size, colour).save(path)
    return path.name


def _gif(path, colours):
    # 3 frames per second: VITA's sampling rate, so every frame is a sampling position.
    frames = [Image.new("RGB", (SIZE, SIZE), c) for c in colours]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=333, loop=0)
    return path.name


def _wav(path, seconds):
    t = np.arange(int(seconds * RATE)) / RATE
    write_wav(path, 0.3 * np.sin(2 * np.pi * 440 * t), RATE)
    return path.name


def _frames(num_samples):
    """Kaldi snip-edges frame count for 25 ms windows and 10 ms hops at 16 kHz."""
    return 1 + (num_samples - 400) // 160


def _vita_tokens(frames):
    return len(range(frames)[2::2][2::2][0::2])


def _expected_pixels(colour):
    rgb = torch.tensor(colour, dtype=torch.float32) / 255.0
    value = (rgb - torch.tensor(MEAN)) / torch.tensor(STD)
    return value.view(3, 1, 1).expand(3, SIZE, SIZE)


def _conv(question, answer="ok"):
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


def _dataset(records, root, tok, source="data.json"):
    return VitaJsonDataset(records, str(root), tok, QWEN2P5_INSTRUCT, ImageTransform(SIZE, MEAN, STD),
                           AudioTransform(), source=source)


def test_image_record(tmp_path, tok):
    red, blue = (200, 10, 10), (10, 20, 230)
    records = [{"id": "two-images", "image": [_png(tmp_path / "a.png", red), _png(tmp_path / "b.png", blue)],
                "conversations": _conv("<image>\n<image>\nWhich is red?", "the first")}]
    sample = _dataset(records, tmp_path, tok)[0]
    assert sample.sample_id == "two-images"
    assert sample.modality == "image"
    assert len(sample.images) == 2
    torch.testing.assert_close(sample.images[0], _expected_pixels(red), atol=1e-5, rtol=0)
    torch.testing.assert_close(sample.images[1], _expected_pixels(blue), atol=1e-5, rtol=0)
    assert sample.input_ids.count(IMAGE_TOKEN_INDEX) == 2
    assert sample.audios == [] and sample.audio_token_lengths == []
    assert len(sample.input_ids) == len(sample.labels)


def test_single_image_path_string_and_absolute_path(tmp_path, tok):
    sub = tmp_path / "elsewhere"
    sub.mkdir()
    _png(sub / "c.png", (0, 255, 0))
    records = [{"id": 7, "image": str(sub / "c.png"), "conversations": _conv("<image>")}]
    sample = _dataset(records, tmp_path / "root-not-used", tok)[0]
    assert sample.sample_id == "7"
    assert len(sample.images) == 1


def test_video_expands_to_one_placeholder_per_frame(tmp_path, tok):
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)]
    records = [{"id": "vid", "video": _gif(tmp_path / "v.gif", colours),
                "conversations": _conv("<video>\nWhat happens?", "colours change")}]
    sample = _dataset(records, tmp_path, tok)[0]
    assert sample.modality == "video"
    assert len(sample.images) == len(colours)
    ids = sample.input_ids
    first = ids.index(IMAGE_TOKEN_INDEX)
    assert ids[first: first + 4] == [IMAGE_TOKEN_INDEX] * 4
    assert ids.count(IMAGE_TOKEN_INDEX) == 4
    for image, colour in zip(sample.images, colours):
        torch.testing.assert_close(image, _expected_pixels(colour), atol=1e-5, rtol=0)
    system = tok.decode([i for i in ids if i >= 0][:40])
    assert QWEN2P5_INSTRUCT.system_prompts["video"] in system


def test_long_video_is_subsampled_evenly(tmp_path):
    colours = [(10 * i, 255 - 10 * i, (37 * i) % 256) for i in range(20)]
    path = tmp_path / "long.gif"
    _gif(path, colours)
    frames = load_video_frames(str(path), max_frames=8)
    assert len(frames) == 8
    picks = [0, 2, 5, 8, 10, 13, 16, 19]  # VITA: np.linspace(0, 19, num=8, dtype=int) over the 20 positions
    assert [f.getpixel((0, 0)) for f in frames] == [colours[p] for p in picks]


def test_audio_record_features_and_token_lengths(tmp_path, tok):
    records = [{"id": "aud", "audio": [_wav(tmp_path / "x.wav", 0.5), _wav(tmp_path / "y.wav", 0.31)],
                "conversations": _conv("<audio>\n<audio>\nSame tone?", "yes")}]
    sample = _dataset(records, tmp_path, tok)[0]
    assert sample.modality == "lang"
    frames = [_frames(int(0.5 * RATE)), _frames(int(0.31 * RATE))]
    assert [a.shape for a in sample.audios] == [(n, 80) for n in frames]
    assert sample.audio_token_lengths == [_vita_tokens(n) for n in frames]
    assert sample.input_ids.count(AUDIO_TOKEN_INDEX) == 2
    # the first answer token is the audio-query state token
    first_label = next(lab for lab in sample.labels if lab != IGNORE_INDEX)
    assert first_label == tok.convert_tokens_to_ids("☞")


def test_collator_pads_everything(tmp_path, tok):
    records = [
        {"id": "img", "image": _png(tmp_path / "a.png", (1, 2, 3)), "conversations": _conv("<image>", "short")},
        {"id": "aud", "audio": _wav(tmp_path / "x.wav", 0.3),
         "conversations": _conv("<audio>\nA longer question here?", "a much longer answer than before")},
        {"id": "both", "image": _png(tmp_path / "b.png", (4, 5, 6)), "audio": _wav(tmp_path / "y.wav", 0.6),
         "conversations": _conv("<image><audio>", "x")},
        {"id": "txt", "conversations": _conv("hi", "hello")},
    ]
    ds = _dataset(records, tmp_path, tok)
    samples = [ds[i] for i in range(len(ds))]
    batch = Collator(tok.pad_token_id)(samples)
    lengths = [len(s.input_ids) for s in samples]
    longest = max(lengths)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (4, longest)
    assert batch["sample_ids"] == ["img", "aud", "both", "txt"]
    for row, (s, n) in enumerate(zip(samples, lengths)):
        assert batch["input_ids"][row, :n].tolist() == s.input_ids
        assert batch["labels"][row, :n].tolist() == s.labels
        assert batch["input_ids"][row, n:].tolist() == [tok.pad_token_id] * (longest - n)
        assert batch["labels"][row, n:].tolist() == [IGNORE_INDEX] * (longest - n)
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (longest - n)
    # images stacked in sample order
    assert batch["images"].shape == (2, 3, SIZE, SIZE)
    assert torch.equal(batch["images"][0], samples[0].images[0])
    assert torch.equal(batch["images"][1], samples[2].images[0])
    # audios zero-padded to the longest clip, with true lengths and token counts
    clips = [samples[1].audios[0], samples[2].audios[0]]
    assert batch["audio_lengths"].tolist() == [c.shape[0] for c in clips]
    assert batch["audios"].shape == (2, max(c.shape[0] for c in clips), 80)
    for i, clip in enumerate(clips):
        assert torch.equal(batch["audios"][i, : clip.shape[0]], clip)
        assert torch.count_nonzero(batch["audios"][i, clip.shape[0]:]) == 0
    assert batch["audio_token_lengths"].tolist() == samples[1].audio_token_lengths + samples[2].audio_token_lengths


def test_collator_text_only_batch_has_no_media_keys(tok):
    from vitacore.data.dataset import Sample

    samples = [Sample("a", [5, 6, 7], [IGNORE_INDEX, 6, 7], [], [], [], "lang"),
               Sample("b", [8], [8], [], [], [], "lang")]
    batch = Collator(pad_token_id=3)(samples)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 3, 3]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6, 7], [8, IGNORE_INDEX, IGNORE_INDEX]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert not {"images", "audios", "audio_lengths", "audio_token_lengths"} & set(batch)


# ---- load_records errors -------------------------------------------------
def test_load_records_reads_a_list(tmp_path):
    records = [{"id": "a", "conversations": _conv("q")}]
    path = tmp_path / "ok.json"
    path.write_text(json.dumps(records))
    assert load_records(str(path)) == records


def test_malformed_json_names_file_and_line(tmp_path):
    path = tmp_path / "broken_data.json"
    path.write_text('[\n  {"id": "a",\n   "conversations": [}\n]\n')
    with pytest.raises(ValueError) as err:
        load_records(str(path))
    message = str(err.value)
    assert "broken_data.json" in message
    assert "line 3" in message


def test_non_list_json_raises(tmp_path):
    path = tmp_path / "dict.json"
    path.write_text(json.dumps({"conversations": []}))
    with pytest.raises(ValueError, match="dict.json.*list"):
        load_records(str(path))


def test_record_without_conversations_names_its_index(tmp_path):
    path = tmp_path / "records.json"
    path.write_text(json.dumps([{"id": "a", "conversations": _conv("q")}, {"id": "b"}]))
    with pytest.raises(ValueError) as err:
        load_records(str(path))
    assert "record 1" in str(err.value) and "conversations" in str(err.value)


def test_missing_data_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.json"):
        load_records(str(tmp_path / "nothing.json"))


# ---- per-record errors ---------------------------------------------------
def test_missing_image_names_record_and_path(tmp_path, tok):
    records = [{"id": "rec-missing", "image": "pics/gone.png", "conversations": _conv("<image>")}]
    with pytest.raises(ValueError) as err:  # a bad sample (vitacore.data.bad_samples)
        _dataset(records, tmp_path, tok, source="train.json")[0]
    message = str(err.value)
    assert "rec-missing" in message
    assert str(tmp_path / "pics" / "gone.png") in message
    assert "train.json" in message


def test_missing_audio_names_record_and_path(tmp_path, tok):
    records = [{"id": "no-wav", "audio": "lost.wav", "conversations": _conv("<audio>")}]
    with pytest.raises(ValueError) as err:  # a bad sample (vitacore.data.bad_samples)
        _dataset(records, tmp_path, tok)[0]
    assert "no-wav" in str(err.value) and "lost.wav" in str(err.value)


@pytest.mark.parametrize("question", ["no placeholder", "<image><image>"])
def test_image_placeholder_count_mismatch_names_record(tmp_path, tok, question):
    records = [{"id": "rec-count", "image": _png(tmp_path / "a.png", (9, 9, 9)), "conversations": _conv(question)}]
    with pytest.raises(ValueError) as err:
        _dataset(records, tmp_path, tok)[0]
    assert "rec-count" in str(err.value)
    assert "placeholder" in str(err.value)


def test_audio_placeholder_count_mismatch_names_record(tmp_path, tok):
    records = [{"id": "rec-audio-count", "audio": [_wav(tmp_path / "x.wav", 0.2)],
                "conversations": _conv("<audio><audio>")}]
    with pytest.raises(ValueError, match="rec-audio-count"):
        _dataset(records, tmp_path, tok)[0]


def test_placeholder_without_media_raises(tmp_path, tok):
    records = [{"id": "text-with-image-tag", "conversations": _conv("<image> describe")}]
    with pytest.raises(ValueError, match="text-with-image-tag"):
        _dataset(records, tmp_path, tok)[0]


def test_corrupt_wav_names_the_path(tmp_path, tok):
    (tmp_path / "bad.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunkjunkjunk")
    records = [{"id": "rec-wav", "audio": "bad.wav", "conversations": _conv("<audio>")}]
    with pytest.raises(ValueError) as err:
        _dataset(records, tmp_path, tok)[0]
    assert str(tmp_path / "bad.wav") in str(err.value)
    assert "rec-wav" in str(err.value)


def test_media_without_vision_tower_raises(tmp_path, tok):
    records = [{"id": "r", "image": _png(tmp_path / "a.png", (0, 0, 0)), "conversations": _conv("<image>")}]
    ds = VitaJsonDataset(records, str(tmp_path), tok, QWEN2P5_INSTRUCT, None, AudioTransform())
    with pytest.raises(ValueError, match="vision tower"):
        ds[0]


def test_bad_roles_error_names_record(tmp_path, tok):
    records = [{"id": "rec-roles", "conversations": [{"from": "human", "value": "a"}, {"from": "human", "value": "b"},
                                                      {"from": "gpt", "value": "x"}]}]
    with pytest.raises(ValueError) as err:
        _dataset(records, tmp_path, tok)[0]
    assert "rec-roles" in str(err.value) and "conversations[1]" in str(err.value)


def test_records_are_not_mutated_by_video_expansion(tmp_path, tok):
    records = [{"id": "vid", "video": _gif(tmp_path / "v.gif", [(0, 0, 0), (255, 255, 255)]),
                "conversations": _conv("<video>")}]
    ds = _dataset(records, tmp_path, tok)
    a, b = ds[0], ds[0]
    assert a.input_ids == b.input_ids
    assert records[0]["conversations"][0]["value"] == "<video>"


def test_each_video_expands_to_its_own_frame_count(tmp_path, tok):
    short = _gif(tmp_path / "short.gif", [(255, 0, 0), (0, 255, 0), (0, 0, 0), (9, 9, 9)])
    long = _gif(tmp_path / "long.gif", [(0, 0, 255), (255, 255, 0), (0, 255, 255), (7, 7, 7), (5, 5, 5)])
    records = [{"id": "two-videos", "video": [short, long], "conversations": _conv("<video>\n<video>\nCompare.")}]
    sample = _dataset(records, tmp_path, tok)[0]
    assert len(sample.images) == 9
    assert sample.input_ids.count(IMAGE_TOKEN_INDEX) == 9


def test_corrupt_image_names_record_and_path(tmp_path, tok):
    (tmp_path / "broken.png").write_bytes(b"not a png at all")
    records = [{"id": "rec-png", "image": "broken.png", "conversations": _conv("<image>")}]
    with pytest.raises(ValueError) as err:
        _dataset(records, tmp_path, tok)[0]
    assert "rec-png" in str(err.value) and str(tmp_path / "broken.png") in str(err.value)


def test_corrupt_video_names_record_and_path(tmp_path, tok):
    (tmp_path / "broken.gif").write_bytes(b"GIF89a then garbage")
    records = [{"id": "rec-gif", "video": "broken.gif", "conversations": _conv("<video>")}]
    with pytest.raises(ValueError) as err:
        _dataset(records, tmp_path, tok)[0]
    assert "rec-gif" in str(err.value) and str(tmp_path / "broken.gif") in str(err.value)
