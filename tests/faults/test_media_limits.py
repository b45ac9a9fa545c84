"""Hostile media: each file costs a header read, becomes a counted bad sample, and memory stays bounded.

Each case builds the dataset the trainer uses (``build_data`` from a ``--data_path`` JSON, a real
tokenizer) in a fresh process: record 0 carries the hostile media, record 1 is plain text. Under
``--on_bad_sample skip`` item 0 must come back as record 1 marked as a replacement (and be counted by
the trainer's :class:`~vitacore.data.bad_samples.BadSampleLog`); under ``error`` it must raise a
ValueError naming the JSON file, the media file and the flag that raises the limit. The process's
peak resident memory (``ru_maxrss``) must stay under 2 GiB.

Run as a script (``python test_media_limits.py CASE FOLDER``), this file is that process.
"""

import json
import os
import struct
import subprocess
import sys
import time
import zlib

import pytest

PEAK_LIMIT_MB = 2048
TILE = 448  # InternViT's input size: a 4x3 grid of it plus the thumbnail is 13 tiles


def _png_bomb(path, width, height):
    """A 1-bit greyscale PNG of ``width x height`` zeros, written row by row (a few hundred KB on disk)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    packer, row = zlib.compressobj(9), b"\x00" * (1 + (width + 7) // 8)  # filter byte, then packed bits
    idat = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    with open(path, "wb") as out:
        out.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)))
        out.write(chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def _gif(path, frames, side):
    """An animated GIF on a ``side x side`` canvas whose frames are 1x1 dots (10 ms each): tiny on disk,
    but every frame decodes to a full canvas."""
    blocks = [b"GIF89a", struct.pack("<HHBBB", side, side, 0x80, 0, 0), b"\x00\x00\x00\xff\xff\xff"]
    for index in range(frames):
        x, y = index % side, (index // side) % side
        blocks.append(b"\x21\xf9\x04\x00\x01\x00\x00\x00")  # graphic control: 10 ms
        blocks.append(b"\x2c" + struct.pack("<HHHHB", x, y, 1, 1, 0))
        blocks.append(b"\x02\x02\x44\x01\x00")  # LZW (min code size 2): clear, colour 0, end
    blocks.append(b";")
    with open(path, "wb") as out:
        out.write(b"".join(blocks))


def _wav(path, seconds, rate, claimed_rate=None):
    """A silent 16-bit mono WAV; ``claimed_rate`` overwrites the header's sample rate afterwards."""
    import numpy as np

    from vitacore.data.audio import write_wav

    write_wav(path, np.zeros(int(seconds * rate)), rate)
    if claimed_rate is not None:
        with open(path, "r+b") as fh:
            fh.seek(24)  # fmt chunk: sample rate, then byte rate
            fh.write(struct.pack("<II", claimed_rate, min(claimed_rate * 2, 2**32 - 1)))


def _video(path, frames):
    """A ``frames``-frame 32x32 MPEG-4 clip at 30 fps."""
    import av
    import numpy as np

    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=30)
        stream.width = stream.height = 32
        stream.pix_fmt = "yuv420p"
        for index in range(frames):
            image = np.full((32, 32, 3), index % 256, dtype=np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode())


def _turns(question):
    return [{"from": "human", "value": question}, {"from": "gpt", "value": "an answer"}]


def _image_record(name, count):
    return {"id": "hostile", "image": [name] * count, "conversations": _turns("<image>\n" * count + "what is it?")}


def _make(case, folder):
    """The hostile record of ``case`` (its files written to ``folder``), the flag it trips, the media file."""
    from PIL import Image

    if case.startswith("bomb"):  # past Pillow's error threshold / between its warning and its error
        width, height = (30000, 30000) if case == "bomb_pillow_error" else (12000, 10000)
        _png_bomb(folder / "bomb.png", width, height)
        return _image_record("bomb.png", 1), "max_image_pixels", "bomb.png"
    if case == "gif_3000_frames":
        _gif(folder / "long.gif", 3000, 512)
        return ({"id": "hostile", "video": "long.gif", "conversations": _turns("<video>\nwhat happens?")},
                "max_animation_frames", "long.gif")
    if case == "wav_4ghz":
        _wav(folder / "fast.wav", 1.0, 16000, claimed_rate=2**32 - 1)
        return ({"id": "hostile", "audio": "fast.wav", "conversations": _turns("<audio>\nwhat is said?")},
                "max_audio_sample_rate", "fast.wav")
    if case == "wav_too_long":
        _wav(folder / "long.wav", 601, 8000)
        return ({"id": "hostile", "audio": "long.wav", "conversations": _turns("<audio>\nwhat is said?")},
                "max_audio_seconds", "long.wav")
    if case == "video_too_many_frames":  # with --max_video_frames_decoded 50
        _video(folder / "long.mp4", 100)
        return ({"id": "hostile", "video": "long.mp4", "conversations": _turns("<video>\nwhat happens?")},
                "max_video_frames_decoded", "long.mp4")
    Image.new("RGB", (4 * TILE, 3 * TILE), (90, 120, 200)).save(folder / "wide.png")
    if case == "placeholders_300":
        return _image_record("wide.png", 300), "max_images_per_record", None
    assert case == "tiles_390"  # 30 images of 13 tiles each
    return _image_record("wide.png", 30), "max_tiles_per_record", None


def _run_case(case, folder):
    """The child process: build the data as a run does, draw the hostile record under skip and error."""
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))  # a regression fails here, not in the OOM killer
    from pathlib import Path

    from vitacore.data import AudioTransform, BadSampleLog, DataSpec, ImageSpec, ModelInputs, build_data
    from vitacore.data.media_limits import MediaLimits
    from vitacore.demo.tokenizer import build_tokenizer

    folder = Path(folder)
    record, flag, media = _make(case, folder)
    data = folder / "train.json"
    data.write_text(json.dumps([record, {"id": "plain", "conversations": _turns("hello")}]))
    limits = MediaLimits(max_video_frames_decoded=50) if case == "video_too_many_frames" else MediaLimits()
    tokenizer = build_tokenizer()
    inputs = ModelInputs(ImageSpec(TILE, (0.5,) * 3, (0.5,) * 3), tokens_per_image=4, audio_transform=AudioTransform())
    bundle = build_data(DataSpec(data_path=str(data), on_bad_sample="skip", media_limits=limits), tokenizer, inputs)
    lengths = bundle.train.modality_lengths  # the length-grouped sampler reads headers too
    sample = bundle.train[0]
    counted = BadSampleLog(max_ratio=1.0, write=lambda line: None).observe(bundle.collator([sample]))
    bundle.train.on_bad_sample = "error"
    try:
        bundle.train[0]
        error = None
    except ValueError as err:
        error = str(err)
    marker = sample.replaced_from
    print(json.dumps({
        "flag": flag, "media": media, "data": str(data), "lengths": len(lengths), "sample_id": sample.sample_id,
        "replaced": None if marker is None else {"index": marker.index, "by": marker.replaced_by,
                                                 "message": marker.message},
        "counted": counted, "error": error, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


CASES = {
    "bomb_pillow_error": "a 30000x30000 1-bit PNG (900 M pixels, ~110 KB on disk): Pillow raises its own bomb error",
    "bomb_pillow_warning": "a 12000x10000 1-bit PNG (120 M pixels): Pillow only warns and would decode it",
    "gif_3000_frames": "a 3,000-frame animated GIF on a 512x512 canvas given as a video",
    "wav_4ghz": "a 1 s WAV whose header claims 4,294,967,295 Hz",
    "wav_too_long": "a 601 s WAV (8 kHz) with the default --max_audio_seconds 600",
    "placeholders_300": "300 <image> placeholders (300 images of 1792x1344) with tiling on",
    "tiles_390": "30 images of 1792x1344, 13 tiles each with tiling on: 390 tiles",
    "video_too_many_frames": "a 100-frame MP4 with --max_video_frames_decoded 50",
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_hostile_media_is_a_counted_bad_sample_with_bounded_memory(tmp_path, case):
    """Setup: a --data_path JSON whose record 0 is the hostile media of ``case`` and record 1 plain text,
    built by build_data with a real tokenizer in a fresh process.
    Expect: under skip, item 0 is record 1 marked as replacing record 0 and counted once; under error,
    a ValueError naming the JSON file, record 0, the media file and the flag; peak RSS under 2 GiB."""
    started = time.monotonic()
    done = subprocess.run([sys.executable, __file__, case, str(tmp_path)], capture_output=True, text=True,
                          timeout=120)
    seconds = time.monotonic() - started
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"{case}: peak {result['peak_mb']:.0f} MB, {seconds:.1f} s")
    flag, media = result["flag"], result["media"]
    assert result["peak_mb"] < PEAK_LIMIT_MB, result
    assert result["sample_id"] == "plain" and result["counted"] == 1, result
    assert result["replaced"] == {"index": 0, "by": 1, "message": result["replaced"]["message"]}, result
    for message in (result["replaced"]["message"], result["error"]):
        assert message and f"{result['data']}, record 0 (id 'hostile')" in message, message
        assert f"--{flag}" in message, message
        if media:
            assert os.path.join(str(tmp_path), media) in message, message
    assert seconds < 60, seconds


def test_the_limits_are_the_flags_and_raising_one_accepts_the_file(tmp_path):
    """Setup: --max_image_pixels 100 and the other limit flags through the run's derived specs, then a
    record with a 20x20 image built by build_data.
    Expect: the DataSpec carries every flag; at 100 pixels the image is a bad sample naming the flag,
    with the flag's default the same record is a good sample."""
    from PIL import Image

    from vitacore.config import parse_args
    from vitacore.data import DataSpec, ImageSpec, ModelInputs, build_data
    from vitacore.data.media_limits import MediaLimits
    from vitacore.demo import SyntheticSelection
    from vitacore.demo.tokenizer import build_tokenizer
    from vitacore.recipes.specs import data_spec

    flags = {"max_image_pixels": 100, "max_images_per_record": 3, "max_tiles_per_record": 7,
             "max_video_frames_decoded": 11, "max_animation_frames": 13, "max_audio_sample_rate": 8000,
             "max_audio_seconds": 2.5}
    config = parse_args([arg for name, value in flags.items() for arg in (f"--{name}", str(value))])
    assert data_spec(config, None, SyntheticSelection(("a",), "b")).media_limits == MediaLimits(**flags)
    assert data_spec(parse_args([]), None, SyntheticSelection(("a",), "b")).media_limits == MediaLimits()

    Image.new("RGB", (20, 20), (1, 2, 3)).save(tmp_path / "small.png")
    data = tmp_path / "train.json"
    data.write_text(json.dumps([_image_record("small.png", 1), {"id": "plain", "conversations": _turns("hi")}]))
    tokenizer, inputs = build_tokenizer(), ModelInputs(ImageSpec(16, (0.5,) * 3, (0.5,) * 3), tokens_per_image=4)
    strict = build_data(DataSpec(data_path=str(data), on_bad_sample="error", media_limits=MediaLimits(**flags)),
                        tokenizer, inputs)
    with pytest.raises(ValueError, match=r"small.png has 400 pixels, over the limit --max_image_pixels 100"):
        strict.train[0]
    default = build_data(DataSpec(data_path=str(data), on_bad_sample="error"), tokenizer, inputs)
    assert default.train[0].sample_id == "hostile" and len(default.train[0].images) == 1


if __name__ == "__main__":
    _run_case(sys.argv[1], sys.argv[2])
