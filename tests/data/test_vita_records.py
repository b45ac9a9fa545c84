"""Acceptance: VITA-format records give exactly the expected token ids and labels.

The expected ids are assembled by hand from the qwen2p5_instruct pieces (ChatML), written out here
as literal strings rather than read from the template, so a change to the template shows up.
"""

import json

import numpy as np
import pytest
from PIL import Image

from vitacore.constants import AUDIO_TOKEN_INDEX as AUD
from vitacore.constants import IGNORE_INDEX as IGN
from vitacore.constants import IMAGE_TOKEN_INDEX as IMG
from vitacore.data.audio import AudioTransform, write_wav
from vitacore.data.conversation import QWEN2P5_INSTRUCT, SYSTEM_PROMPTS
from vitacore.data.dataset import VitaJsonDataset, load_records
from vitacore.data.images import ImageTransform
from vitacore.data.tiling import ImageTiler
from vitacore.demo.tokenizer import build_tokenizer

SIZE = 16
RATE = 16000


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def _enc(tok, text):
    return tok.encode(text, add_special_tokens=False)


def _png(path, size=(SIZE, SIZE), colour=(120, 40, 200)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def _gif(path, frames):
    path.parent.mkdir(parents=True, exist_ok=True)
    images = [Image.new("RGB", (SIZE, SIZE), (30 * i, 0, 0)) for i in range(frames)]
    images[0].save(path, save_all=True, append_images=images[1:], duration=100, loop=0)


def _wav(path, seconds=0.3):
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(seconds * RATE)) / RATE
    write_wav(path, 0.3 * np.sin(2 * np.pi * 440 * t), RATE)


def _sample(tmp_path, tok, record, tiler=None):
    data = tmp_path / "data.json"
    data.write_text(json.dumps([record]))
    records = load_records(str(data))
    dataset = VitaJsonDataset(records, str(tmp_path), tok, QWEN2P5_INSTRUCT,
                              ImageTransform(SIZE, (0.5,) * 3, (0.5,) * 3), AudioTransform(),
                              source=str(data), image_tiler=tiler)
    return dataset[0]


class _Expected:
    """Expected ids / labels built piece by piece: ``masked`` pieces get IGNORE labels.

    Turns are separated by a masked newline; nothing follows the last answer (VITA's prompt ends at
    its last ``<|im_end|>``).
    """

    def __init__(self, tok, modality):
        self.tok, self.ids, self.labels = tok, [], []
        self.masked(f"<|im_start|>system\n{SYSTEM_PROMPTS[modality]}<|im_end|>\n")

    def masked(self, *pieces):
        for piece in pieces:
            ids = [piece] if isinstance(piece, int) else _enc(self.tok, piece)
            self.ids += ids
            self.labels += [IGN] * len(ids)

    def user(self, *pieces):
        if len(self.ids) and self.labels[-1] != IGN:
            self.masked("\n")  # after an answer
        self.masked("<|im_start|>user\n", *pieces, "<|im_end|>\n")

    def answer(self, state, text):
        self.masked("<|im_start|>assistant\n")
        ids = _enc(self.tok, f"{state}{text}<|im_end|>")
        self.ids += ids
        self.labels += ids


def _check(sample, expected):
    assert sample.input_ids == expected.ids
    assert sample.labels == expected.labels


# VITA's README example (README.md:105-128): one image, one audio query, one answer.
README_ANSWER = "This is a well-organized kitchen with a clean, modern aesthetic."


def _readme_record(tmp_path, image_size=(SIZE, SIZE)):
    _png(tmp_path / "coco/images/train2017/000000000164.jpg", image_size)
    _wav(tmp_path / "new_value_dict_0717/output_wavs/f61cf238b7872b4903e1fc15dcb5a50c.wav")
    return {
        "set": "sharegpt4",
        "id": "000000000164",
        "conversations": [
            {"from": "human", "value": "<image>\n<audio>\n"},
            {"from": "gpt", "value": README_ANSWER},
        ],
        "image": "coco/images/train2017/000000000164.jpg",
        "audio": ["new_value_dict_0717/output_wavs/f61cf238b7872b4903e1fc15dcb5a50c.wav"],
    }


def test_readme_example_image_and_audio(tmp_path, tok):
    sample = _sample(tmp_path, tok, _readme_record(tmp_path))
    want = _Expected(tok, "image")
    # VITA: "<image>\n" loses its newline, the expanded image gets one back, "<audio>\n" becomes "<audio>".
    want.user(IMG, "\n", AUD)
    want.answer("☞", README_ANSWER)
    _check(sample, want)
    assert sample.modality == "image" and len(sample.images) == 1 and len(sample.audios) == 1


def test_readme_example_with_dynamic_tiling(tmp_path, tok):
    # 2:1 image -> a 2x1 grid plus the thumbnail: three image blocks in place of one <image>.
    sample = _sample(tmp_path, tok, _readme_record(tmp_path, (2 * SIZE, SIZE)), tiler=ImageTiler(SIZE))
    want = _Expected(tok, "image")
    want.user(IMG, IMG, IMG, "\n", AUD)
    want.answer("☞", README_ANSWER)
    _check(sample, want)
    assert len(sample.images) == 3


def test_video_with_audio_and_inserted_turn(tmp_path, tok):
    # Reference's video / negative-sample shape: the second answer is the inserted (noisy-audio) turn.
    _gif(tmp_path / "clips/v001.gif", 3)
    _wav(tmp_path / "q_001.wav")
    _wav(tmp_path / "noise_017.wav")
    record = {
        "set": "my_videos", "id": "v001", "video": "clips/v001.gif",
        "audio": ["q_001.wav", "noise_017.wav"], "inserted_id": 3, "end_tag": True,
        "conversations": [
            {"from": "human", "value": "<video>\n<audio>"},
            {"from": "gpt", "value": "The man is slicing bread."},
            {"from": "human", "value": "<audio>"},
            {"from": "gpt", "value": "..."},
        ],
    }
    sample = _sample(tmp_path, tok, record)
    want = _Expected(tok, "video")
    # 3 frames at 10 fps: one 3-fps position, stretched to VITA's minimum of 4 frames.
    want.user(IMG, IMG, IMG, IMG, "\n", AUD)
    want.answer("☞", "The man is slicing bread.")
    want.user(AUD)
    want.answer("☟", "...")
    _check(sample, want)
    assert sample.modality == "video" and len(sample.images) == 4 and len(sample.audios) == 2


def test_multiple_images_text_queries(tmp_path, tok):
    _png(tmp_path / "a.png", colour=(200, 0, 0))
    _png(tmp_path / "b.png", colour=(0, 0, 200))
    record = {
        "id": "two", "set": "s", "image": ["a.png", "b.png"],
        "conversations": [
            {"from": "human", "value": "<image>\n<image>\nWhich one is red?"},
            {"from": "gpt", "value": "The first one."},
            {"from": "human", "value": "And the other?"},
            {"from": "gpt", "value": "Blue."},
        ],
    }
    sample = _sample(tmp_path, tok, record)
    want = _Expected(tok, "image")
    want.user(IMG, "\n", IMG, "\nWhich one is red?")
    want.answer("☜", "The first one.")
    want.user("And the other?")
    want.answer("☜", "Blue.")
    _check(sample, want)
    assert len(sample.images) == 2


def test_text_only(tmp_path, tok):
    record = {"id": "t", "conversations": [
        {"from": "human", "value": "What is two plus two?"},
        {"from": "gpt", "value": "Four."},
    ]}
    sample = _sample(tmp_path, tok, record)
    want = _Expected(tok, "lang")
    want.user("What is two plus two?")
    want.answer("☜", "Four.")
    _check(sample, want)
    assert sample.modality == "lang" and sample.images == [] and sample.audios == []


def test_inserted_id_audio_only(tmp_path, tok):
    # An audio-only conversation whose first answer is the inserted turn; the second is a real query.
    _wav(tmp_path / "noise.wav")
    _wav(tmp_path / "query.wav")
    record = {"id": "neg", "audio": ["noise.wav", "query.wav"], "inserted_id": 1, "conversations": [
        {"from": "human", "value": "<audio>"},
        {"from": "gpt", "value": "Not a question."},
        {"from": "human", "value": "<audio>"},
        {"from": "gpt", "value": "Sure."},
    ]}
    sample = _sample(tmp_path, tok, record)
    want = _Expected(tok, "lang")
    want.user(AUD)
    want.answer("☟", "Not a question.")
    want.user(AUD)
    want.answer("☞", "Sure.")
    _check(sample, want)
