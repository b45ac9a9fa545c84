"""Video decoding (PyAV for containers, PIL for GIF) and VITA's 3 fps / 4..16 frame sampling."""

import random
from fractions import Fraction

import numpy as np
import pytest
from PIL import Image, ImageSequence

from vitacore.data.bad_samples import BadSampleError
from vitacore.data.dataset import load_video_frames
from vitacore.data.lengths import count_video_frames
from vitacore.data.video import _gif_durations, count_sampled_frames, load_video, sample_frame_indices

av = pytest.importorskip("av")


def _write_mp4(path, num_frames: int, fps: int, size: int = 32) -> None:
    """A clip whose frame i is a flat grey of level 8*i (mod 256), so frames can be identified."""
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=Fraction(fps))
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        stream.options = {"qscale": "1"}
        for i in range(num_frames):
            img = np.full((size, size, 3), (8 * i) % 256, dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def _level(frame: Image.Image) -> int:
    return int(round(np.asarray(frame, dtype=np.float64).mean() / 8))


def _vita_reference(n: int, fps: float) -> list[int]:
    # Written out from VITA's _get_rawvideo_dec, independently of sample_frame_indices.
    stride = int(round(fps / 3))
    pos = list(range(0, n, stride))
    if len(pos) > 16:
        return [pos[i] for i in np.linspace(0, len(pos) - 1, num=16, dtype=int)]
    if len(pos) < 4:
        return [pos[i] for i in np.linspace(0, len(pos) - 1, num=4, dtype=int)]
    return pos


@pytest.mark.parametrize("seconds", [1, 3, 10])
@pytest.mark.parametrize("fps", [6, 10, 24, 25, 30])
def test_indices_match_vita(seconds, fps):
    n = seconds * fps
    indices = sample_frame_indices(n, fps)
    assert indices == _vita_reference(n, fps)
    assert 4 <= len(indices) <= 16


def test_indices_examples():
    # 1 s at 30 fps: positions 0, 10, 20 stretched to 4 by linspace(0, 2, 4) -> 0, 0, 1, 2.
    assert sample_frame_indices(30, 30) == [0, 0, 10, 20]
    assert sample_frame_indices(90, 30) == list(range(0, 90, 10))  # 3 s: 9 frames, kept as is
    assert len(sample_frame_indices(300, 30)) == 16  # 10 s: 30 positions thinned to 16
    assert sample_frame_indices(5, 1.0) == [0, 1, 2, 3, 4]  # < 1.5 fps: every frame, no crash
    assert sample_frame_indices(0, 30) == []


@pytest.mark.parametrize("seconds,fps", [(1, 30), (3, 24), (3, 10), (10, 25)])
def test_mp4_decodes_the_sampled_frames(tmp_path, seconds, fps):
    path = tmp_path / "clip.mp4"
    _write_mp4(path, seconds * fps, fps)
    frames, source_fps = load_video(str(path))
    assert source_fps == pytest.approx(fps)
    expected = sample_frame_indices(seconds * fps, fps)
    assert [_level(f) for f in frames] == [(8 * i) % 256 // 8 for i in expected]
    assert all(f.mode == "RGB" and f.size == (32, 32) for f in frames)
    # The length precomputation counts the same frames from metadata alone.
    assert count_sampled_frames(str(path)) == len(frames)
    assert count_video_frames(str(path), 16) == len(frames)
    assert len(load_video_frames(str(path))) == len(frames)


def test_gif_follows_vitas_rule(tmp_path):
    # VITA reads GIFs with the same rule as any clip: 20 frames at 10 fps -> stride round(10 / 3) = 3.
    path = tmp_path / "clip.gif"
    images = [Image.new("RGB", (8, 8), (10 * i, 0, 0)) for i in range(20)]
    images[0].save(path, save_all=True, append_images=images[1:], duration=100, loop=0)
    frames, fps = load_video(str(path), max_frames=16)
    assert fps == pytest.approx(10.0)
    assert [f.getpixel((0, 0))[0] // 10 for f in frames] == [0, 3, 6, 9, 12, 15, 18]
    assert count_video_frames(str(path), 16) == 7
    # 3 frames at 10 fps: one position (0), stretched to VITA's minimum of 4 with repeats.
    short = tmp_path / "short.gif"
    images[0].save(short, save_all=True, append_images=images[1:3], duration=100)
    assert [f.getpixel((0, 0))[0] // 10 for f in load_video(str(short))[0]] == [0, 0, 0, 0]
    assert count_video_frames(str(short), 16) == 4


@pytest.mark.parametrize("name", ["bad.mp4", "bad.webm", "bad.gif"])
def test_corrupt_video_is_value_error_naming_file(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"\x00\x01 definitely not a video" * 40)
    with pytest.raises(ValueError, match=name):
        load_video(str(path))
    assert count_video_frames(str(path), 16) == 1


def test_missing_video_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.mp4"):
        load_video(str(tmp_path / "nope.mp4"))


def test_truncated_mp4_is_value_error(tmp_path):
    path = tmp_path / "cut.mp4"
    _write_mp4(path, 60, 30)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    with pytest.raises(ValueError, match="cut.mp4"):
        load_video(str(path))


def test_dataset_classifies_corrupt_video_as_bad_sample(tmp_path):
    # The dataset's media wrapper turns a loader ValueError into a BadSampleError naming the file.
    from vitacore.data.dataset import VitaJsonDataset

    path = tmp_path / "bad.mp4"
    path.write_bytes(b"garbage" * 100)
    ds = VitaJsonDataset.__new__(VitaJsonDataset)
    ds.media_root = str(tmp_path)
    with pytest.raises(BadSampleError, match="bad.mp4"):
        ds._media("video", "bad.mp4", load_video_frames)


def test_gif_frame_timing_is_read_from_its_blocks_as_pil_reports_it(tmp_path):
    # Counting frames for the length grouping must not decode them; it must still agree with the loader.
    rng = random.Random(0)
    for trial in range(20):
        count = rng.randint(1, 30)
        durations = [rng.choice([0, 20, 50, 100, 333, 1000]) for _ in range(count)]
        frames = [Image.new("RGB", (8 + rng.randint(0, 8), 8), (rng.randint(0, 255), 5 * i % 255, 0))
                  for i in range(count)]
        path = tmp_path / f"clip{trial}.gif"
        frames[0].save(path, save_all=True, append_images=frames[1:], duration=durations, loop=0)
        with Image.open(path) as clip:
            pil = [frame.info.get("duration") or 0 for frame in ImageSequence.Iterator(clip)]
        assert _gif_durations(str(path)) == pil
        assert count_sampled_frames(str(path)) == len(load_video(str(path))[0])
    Image.new("RGB", (8, 8)).save(tmp_path / "still.webp")
    assert _gif_durations(str(tmp_path / "still.webp")) is None  # not a GIF: PIL walks its frames
