"""Parity: vitacore's samples for VITA-format records equal VITA-1.5's, token for token.

For every record, the expected ChatML text is written out below by hand from VITA's rules (see
``vita_reference``); the test-side model of VITA's data code must produce exactly that text, and
vitacore's ``input_ids`` / ``labels`` must equal the model's, with the real Qwen2.5 tokenizer.
Tile and frame counts come from VITA's ``dynamic_preprocess`` / ``_get_rawvideo_dec`` rules.
"""

import json
from dataclasses import dataclass, field

import av
import numpy as np
import pytest
from PIL import Image
from vita_reference import (
    AUDIO_INDEX,
    IGNORE_INDEX,
    IMAGE_INDEX,
    dynamic_tile_count,
    qwen2p5_tokenizer,
    video_frame_count,
    vita_sample,
)

from vitacore.data.audio import AudioTransform, write_wav
from vitacore.data.conversation import QWEN2P5_INSTRUCT, with_system_prompts
from vitacore.data.dataset import VitaJsonDataset, load_records
from vitacore.data.images import ImageTransform
from vitacore.data.tiling import ImageTiler

SIZE = 16  # tile side: VITA's image_size (448 there)
PROMPTS = {"image": "You are an image assistant.", "video": "You are a video assistant.",
           "lang": "You are a helpful assistant."}
SYS_IMAGE = "<|im_start|>system\nYou are an image assistant.<|im_end|>\n"
SYS_VIDEO = "<|im_start|>system\nYou are a video assistant.<|im_end|>\n"
SYS_LANG = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
USER, ASSISTANT, END = "<|im_start|>user\n", "<|im_start|>assistant\n", "<|im_end|>"


@dataclass
class Case:
    """A record, the media files it names, and VITA's prompt text for it (hand-written)."""

    record: dict
    text: str
    images: dict = field(default_factory=dict)  # path -> (width, height)
    video: tuple = ()  # (path, frames, fps)
    audios: tuple = ()


def _turns(*values):
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": v} for i, v in enumerate(values)]


def _image_case(question, user_text):
    return Case({"id": "i", "image": "a.png", "conversations": _turns(question, "Red.")},
                SYS_IMAGE + USER + user_text + END + "\n" + ASSISTANT + "☜Red." + END, {"a.png": (SIZE, SIZE)})


CASES = {
    # The placeholder at the end of the question moves to the front, followed by "\n".
    "image_at_end": _image_case("What colour?\n<image>", "<image>\nWhat colour?"),
    "image_at_start": _image_case("<image>\nWhat colour?", "<image>\nWhat colour?"),
    "image_in_middle": _image_case("Is <image> red?", "Is <image>\n red?"),
    # One image per turn: the k-th turn with an image uses the k-th image's tile count.
    "two_images_two_turns": Case(
        {"id": "2t", "image": ["a.png", "wide.png"],
         "conversations": _turns("<image>\nDescribe this.", "A square.", "And this one?\n<image>", "A strip.")},
        SYS_IMAGE + USER + "<image>\nDescribe this." + END + "\n" + ASSISTANT + "☜A square." + END + "\n"
        + USER + "<image><image><image><image>\nAnd this one?" + END + "\n" + ASSISTANT + "☜A strip." + END,
        {"a.png": (SIZE, SIZE), "wide.png": (3 * SIZE, SIZE)}),
    # Two images in one turn, both 3x1 + thumbnail.
    "two_images_one_turn": Case(
        {"id": "2i", "image": ["w1.png", "w2.png"],
         "conversations": _turns("<image>\n<image>\nCompare them.", "Same.")},
        SYS_IMAGE + USER + "<image><image><image><image>\n<image><image><image><image>\nCompare them." + END + "\n"
        + ASSISTANT + "☜Same." + END, {"w1.png": (3 * SIZE, SIZE), "w2.png": (3 * SIZE, SIZE)}),
    # "<image>\n<audio>\n": the newline after <image> goes, strip() drops the last one; audio query -> ☞.
    "image_and_audio": Case(
        {"id": "ia", "image": "wide.png", "audio": ["q.wav"],
         "conversations": _turns("<image>\n<audio>\n", "A strip.")},
        SYS_IMAGE + USER + "<image><image><image><image>\n<audio>" + END + "\n" + ASSISTANT + "☞A strip." + END,
        {"wide.png": (3 * SIZE, SIZE)}, audios=("q.wav",)),
    "video": Case(
        {"id": "v", "set": "s", "video": "clip.gif", "conversations": _turns("<video>\nWhat happens?", "A fade.")},
        SYS_VIDEO + USER + "<image><image><image><image>\nWhat happens?" + END + "\n" + ASSISTANT + "☜A fade." + END,
        video=("clip.gif", 10, 10.0)),
    # VITA's neg-sample shape: the inserted (noisy-audio) answer gets ☟, the audio query's answer ☞.
    "video_audio_inserted": Case(
        {"id": "va", "set": "s", "video": "clip.gif", "audio": ["q.wav", "noise.wav"], "inserted_id": 3,
         "conversations": _turns("<video>\n<audio>", "Bread is sliced.", "<audio>", "...")},
        SYS_VIDEO + USER + "<image><image><image><image>\n<audio>" + END + "\n" + ASSISTANT + "☞Bread is sliced."
        + END + "\n" + USER + "<audio>" + END + "\n" + ASSISTANT + "☟..." + END,
        video=("clip.gif", 10, 10.0), audios=("q.wav", "noise.wav")),
    "audio_inserted": Case(
        {"id": "an", "audio": ["q.wav", "noise.wav"], "inserted_id": 3,
         "conversations": _turns("<audio>", "Hello!", "<audio>\n", "Not for me.")},
        SYS_LANG + USER + "<audio>" + END + "\n" + ASSISTANT + "☞Hello!" + END + "\n"
        + USER + "<audio>" + END + "\n" + ASSISTANT + "☟Not for me." + END, audios=("q.wav", "noise.wav")),
    # A first gpt turn is dropped after the state tokens were given by the record's turn indices.
    "first_turn_gpt": Case(
        {"id": "g", "audio": ["noise.wav", "q.wav"], "inserted_id": 2,
         "conversations": [{"from": "gpt", "value": "Welcome."}] + _turns("<audio>", "Hmm.", "<audio>", "Yes.")},
        SYS_LANG + USER + "<audio>" + END + "\n" + ASSISTANT + "☟Hmm." + END + "\n"
        + USER + "<audio>" + END + "\n" + ASSISTANT + "☞Yes." + END, audios=("noise.wav", "q.wav")),
    # end_tag false (audio records only): the last 10 characters, "<|im_end|>", are cut.
    "end_tag_false": Case(
        {"id": "e", "audio": ["q.wav"], "end_tag": False, "conversations": _turns("<audio>\nPlease.", "Sure, here")},
        SYS_LANG + USER + "<audio>Please." + END + "\n" + ASSISTANT + "☞Sure, here", audios=("q.wav",)),
    "chinese": Case(
        {"id": "zh", "image": "a.png",
         "conversations": _turns("<image>\n这是什么颜色？", "红色。", "你确定吗？", "确定。")},
        SYS_IMAGE + USER + "<image>\n这是什么颜色？" + END + "\n" + ASSISTANT + "☜红色。" + END + "\n"
        + USER + "你确定吗？" + END + "\n" + ASSISTANT + "☜确定。" + END, {"a.png": (SIZE, SIZE)}),
    "wide_image_tiled": Case(
        {"id": "w", "image": "wide.png", "conversations": _turns("<image>\nDescribe.", "A strip.")},
        SYS_IMAGE + USER + "<image><image><image><image>\nDescribe." + END + "\n" + ASSISTANT + "☜A strip." + END,
        {"wide.png": (3 * SIZE, SIZE)}),
    # Every turn: "\n\n" -> "\n" with str.replace (so "\n\n\n" -> "\n\n" and "\n\n\n\n" -> "\n\n").
    "double_newlines": Case(
        {"id": "n", "conversations": _turns("Two lines.", "One.\n\nTwo.", "Again,\n\n\nplease.", "A.\n\n\n\nB.")},
        SYS_LANG + USER + "Two lines." + END + "\n" + ASSISTANT + "☜One.\nTwo." + END + "\n"
        + USER + "Again,\n\nplease." + END + "\n" + ASSISTANT + "☜A.\n\nB." + END),
    "text_multi_turn": Case(
        {"id": "t", "conversations": _turns("What is 2+2?", "4.", "And 3+3?", "6.", "Thanks!", "You're welcome.")},
        SYS_LANG + USER + "What is 2+2?" + END + "\n" + ASSISTANT + "☜4." + END + "\n"
        + USER + "And 3+3?" + END + "\n" + ASSISTANT + "☜6." + END + "\n"
        + USER + "Thanks!" + END + "\n" + ASSISTANT + "☜You're welcome." + END),
}

# Image size -> tiles by VITA's dynamic_preprocess (min 1, max 12, thumbnail), worked out by hand.
TILINGS = [((SIZE, SIZE), 1), ((3 * SIZE, SIZE), 4), ((SIZE, 2 * SIZE), 3),
           # Square: 1x1, 2x2, 3x3 tie on aspect; a later grid wins if the image has > half its pixels.
           ((2 * SIZE, 2 * SIZE), 5),  # 1024 px > 512 (2x2) but not > 1152 (3x3): 2x2 + thumbnail
           ((3 * SIZE, 3 * SIZE), 10),  # 2304 px > 1152: 3x3 + thumbnail
           ((10 * SIZE, SIZE), 11)]
# (container, frames, fps) -> frames VITA samples (stride round(fps / 3); 4..16 via linspace), by hand.
VIDEOS = [("gif", 10, 10.0, 4), ("gif", 6, 10.0, 4), ("gif", 60, 10.0, 16), ("gif", 30, 20.0, 5),
          ("mp4", 50, 25, 7), ("mp4", 30, 30, 4)]


@pytest.fixture(scope="module")
def tok():
    return qwen2p5_tokenizer()


def _png(path, size):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (120, 40, 200)).save(path)


def _colour(i):
    return (4 * i % 256, 255 - 4 * i % 256, 60)


def _gif(path, frames, fps):
    images = [Image.new("RGB", (SIZE, SIZE), _colour(i)) for i in range(frames)]
    images[0].save(path, save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)


def _mp4(path, frames, fps):
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = SIZE, SIZE, "yuv420p"
        for i in range(frames):
            pixels = np.full((SIZE, SIZE, 3), _colour(i), dtype=np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        container.mux(stream.encode())


def _wav(path, seconds=0.3):
    t = np.arange(int(seconds * 16000)) / 16000
    write_wav(path, 0.3 * np.sin(2 * np.pi * 440 * t), 16000)


def _make_media(tmp_path, case):
    """Writes the case's files; returns VITA's (tiles per image, video frames)."""
    for rel, size in case.images.items():
        _png(tmp_path / rel, size)
    for rel in case.audios:
        _wav(tmp_path / rel)
    frames = 0
    if case.video:
        rel, count, fps = case.video
        (_mp4 if rel.endswith(".mp4") else _gif)(tmp_path / rel, count, fps)
        frames = video_frame_count(count, fps)
    images = case.record.get("image", [])
    images = [images] if isinstance(images, str) else images
    return [dynamic_tile_count(*case.images[rel], SIZE) for rel in images], frames


def _vitacore(tmp_path, tok, record):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([record], ensure_ascii=False))
    template = with_system_prompts(QWEN2P5_INSTRUCT, PROMPTS)
    dataset = VitaJsonDataset(load_records(str(path)), str(tmp_path), tok, template,
                              ImageTransform(SIZE, (0.5,) * 3, (0.5,) * 3), AudioTransform(),
                              source=str(path), image_tiler=ImageTiler(SIZE, 1, 12, True))
    return dataset[0]


def _show(tok, values):
    names = {IMAGE_INDEX: "<IMG>", AUDIO_INDEX: "<AUD>", IGNORE_INDEX: "IGN"}
    return " ".join(names.get(v) or repr(tok.decode([v])) for v in values)


def _assert_same(tok, what, got, want):
    """Equal lists, or a failure naming the first differing position and its neighbourhood."""
    __tracebackhide__ = True
    if got == want:
        return
    n = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
    lo = max(0, n - 3)
    pytest.fail(f"{what}: first difference at position {n} (vitacore {len(got)} long, VITA {len(want)})\n"
                f"  vitacore: ... {_show(tok, got[lo:n + 4])}\n  VITA:     ... {_show(tok, want[lo:n + 4])}")


def _answers(text):
    """The supervised spans of a prompt text: after each assistant header, up to and including <|im_end|>."""
    spans = []
    for chunk in text.split(ASSISTANT)[1:]:
        spans.append(chunk[:chunk.index(END) + len(END)] if END in chunk else chunk)
    return spans


def _spans(tok, ids, labels):
    runs, run = [], []
    for i, label in zip(ids, labels):
        if label != IGNORE_INDEX:
            assert label == i
            run.append(i)
        elif run:
            runs.append(run)
            run = []
    return [tok.decode(r) for r in runs + ([run] if run else [])]


@pytest.mark.parametrize("name", CASES)
def test_reference_matches_hand_written_text(tmp_path, tok, name):
    """The model of VITA's data code gives the hand-written prompt and supervises only the answers."""
    case = CASES[name]
    tiles, frames = _make_media(tmp_path, case)
    want = vita_sample(case.record, tok, PROMPTS, tiles, frames)
    assert want.text == case.text
    assert _spans(tok, want.input_ids, want.labels) == _answers(case.text)
    assert want.input_ids.count(IMAGE_INDEX) == sum(tiles) + frames
    assert want.input_ids.count(AUDIO_INDEX) == len(case.audios)


@pytest.mark.parametrize("name", CASES)
def test_vitacore_matches_vita(tmp_path, tok, name):
    """vitacore's ids and labels equal VITA's for the record, with as many images as VITA loads."""
    case = CASES[name]
    tiles, frames = _make_media(tmp_path, case)
    want = vita_sample(case.record, tok, PROMPTS, tiles, frames)
    sample = _vitacore(tmp_path, tok, case.record)
    _assert_same(tok, "input_ids", sample.input_ids, want.input_ids)
    _assert_same(tok, "labels", sample.labels, want.labels)
    assert len(sample.images) == sum(tiles) + frames
    assert len(sample.audios) == len(case.audios)


def _tiling_case(size, tiles):
    return Case({"id": "w", "image": "x.png", "conversations": _turns("Describe.\n<image>", "Done.")},
                SYS_IMAGE + USER + "<image>" * tiles + "\nDescribe." + END + "\n" + ASSISTANT + "☜Done." + END,
                {"x.png": size})


def _video_case(container, count, fps, frames):
    rel = f"clip.{container}"
    return Case({"id": "v", "set": "s", "video": rel, "conversations": _turns("What happens?\n<video>", "Colours.")},
                SYS_VIDEO + USER + "<image>" * frames + "\nWhat happens?" + END + "\n" + ASSISTANT + "☜Colours." + END,
                video=(rel, count, fps))


@pytest.mark.parametrize("size, tiles", TILINGS)
def test_reference_tile_counts(tmp_path, tok, size, tiles):
    """VITA's grid rule gives the hand-worked tile count, and "<image>" * tiles + "\\n" in the text."""
    assert dynamic_tile_count(*size, SIZE) == tiles
    case = _tiling_case(size, tiles)
    assert vita_sample(case.record, tok, PROMPTS, *_make_media(tmp_path, case)).text == case.text


@pytest.mark.parametrize("size, tiles", TILINGS)
def test_vitacore_tiling_matches_vita(tmp_path, tok, size, tiles):
    """Each image becomes VITA's tile count of -200s, followed by "\\n"."""
    case = _tiling_case(size, tiles)
    want = vita_sample(case.record, tok, PROMPTS, *_make_media(tmp_path, case))
    sample = _vitacore(tmp_path, tok, case.record)
    _assert_same(tok, "input_ids", sample.input_ids, want.input_ids)
    _assert_same(tok, "labels", sample.labels, want.labels)
    assert len(sample.images) == tiles


@pytest.mark.parametrize("container, count, fps, frames", VIDEOS)
def test_reference_frame_counts(tmp_path, tok, container, count, fps, frames):
    """VITA's 3 fps / 4..16 rule gives the hand-worked frame count, each frame one "<image>"."""
    assert video_frame_count(count, fps) == frames
    case = _video_case(container, count, fps, frames)
    assert vita_sample(case.record, tok, PROMPTS, *_make_media(tmp_path, case)).text == case.text


@pytest.mark.parametrize("container, count, fps, frames", VIDEOS)
def test_vitacore_video_frames_match_vita(tmp_path, tok, container, count, fps, frames):
    """vitacore samples as many frames as VITA and lays them out as VITA does."""
    case = _video_case(container, count, fps, frames)
    want = vita_sample(case.record, tok, PROMPTS, *_make_media(tmp_path, case))
    sample = _vitacore(tmp_path, tok, case.record)
    _assert_same(tok, "input_ids", sample.input_ids, want.input_ids)
    _assert_same(tok, "labels", sample.labels, want.labels)
    assert len(sample.images) == frames


def test_mp4_fixture_has_the_intended_frames_and_rate(tmp_path):
    """The test's own MP4s decode to the frame count and rate the expectations assume."""
    _mp4(tmp_path / "c.mp4", 50, 25)
    with av.open(str(tmp_path / "c.mp4")) as container:
        stream = container.streams.video[0]
        assert float(stream.average_rate) == 25
        assert sum(1 for _ in container.decode(stream)) == 50
