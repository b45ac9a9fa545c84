"""Seeking to key frames gives exactly the frames of the sequential decode, for less decoding."""

from fractions import Fraction

import numpy as np
import pytest

from vitacore.data.media_limits import MediaLimitError, MediaLimits
from vitacore.data.video import decode_container, load_video, sample_frame_indices
from vitacore.data.video_seek import DecodeRun, decode_runs, plan_runs, read_timeline

av = pytest.importorskip("av")


def _encodable(codec: str) -> bool:
    try:
        av.codec.Codec(codec, "w")
    except Exception:  # noqa: BLE001 - a build without this encoder
        return False
    return True


def _frames(num_frames: int, width: int = 64, height: int = 48):
    """Frame i is a pattern shifted by i, so every frame differs from its neighbours."""
    yy, xx = np.mgrid[0:height, 0:width]
    for i in range(num_frames):
        image = np.empty((height, width, 3), np.uint8)
        image[..., 0] = (4 * xx + 3 * i) % 256
        image[..., 1] = (4 * yy + 7 * i) % 256
        image[..., 2] = (5 * i) % 256
        yield av.VideoFrame.from_ndarray(image, format="rgb24")


def _write(path, codec: str, num_frames: int, rate, gop: int, num_b_frames: int = 0, durations_ms=None,
           skip_packets: int = 0, options=None) -> str:
    """Encodes a clip; ``durations_ms`` cycles per-frame durations (variable frame rate), the first
    ``skip_packets`` packets are left out (a stream that does not start on a key frame), and
    ``options`` go to the encoder."""
    if not _encodable(codec):
        pytest.skip(f"this PyAV build cannot encode {codec}")
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.gop_size = gop
        stream.codec_context.max_b_frames = num_b_frames
        if codec == "libx264":
            stream.options = {"sc_threshold": "0", **(options or {})}  # key frames at the interval only
        elif options:
            stream.options = options
        if durations_ms:
            stream.codec_context.time_base = Fraction(1, 1000)
        clock = 0
        for i, frame in enumerate([*_frames(num_frames), None]):
            if frame is not None and durations_ms:
                frame.pts, frame.time_base = clock, Fraction(1, 1000)
                clock += durations_ms[i % len(durations_ms)]
            for packet in stream.encode(frame):
                if skip_packets:
                    skip_packets -= 1
                    continue
                out.mux(packet)
    return str(path)


def _assert_same_frames(path, limits=None):
    """Both decodes of ``path``; asserts they give the same indices and pixels and returns them."""
    sequential = decode_container(path, limits, seek=False)
    seeking = decode_container(path, limits, seek=True)
    assert seeking.indices == sequential.indices
    assert seeking.fps == sequential.fps
    assert len(seeking.frames) == len(seeking.indices)
    for index, a, b in zip(seeking.indices, sequential.frames, seeking.frames):
        assert a.mode == b.mode == "RGB" and a.size == b.size
        assert np.array_equal(np.asarray(a), np.asarray(b)), f"frame {index} differs"
    assert sequential.num_seeks == 0
    return sequential, seeking


CLIPS = [  # codec, extension, rate, frames, key-frame interval, B-frames
    ("mpeg4", "mp4", Fraction(30), 301, 12, 2),  # open GOPs: B-frames before a key frame decode after it
    ("libx264", "mp4", Fraction(30000, 1001), 257, 15, 2),  # 29.97 fps
    ("libx264", "mkv", Fraction(25), 203, 10, 3),  # no frame count: estimated from the duration
    ("libvpx-vp9", "webm", Fraction(25, 2), 97, 8, 0),  # 12.5 fps
    ("mpeg4", "avi", Fraction(7), 61, 5, 1),
    ("mpeg2video", "mov", Fraction(24), 151, 12, 2),
    ("libx264", "mp4", Fraction(30), 241, 250, 2),  # one key frame: seeking can only restart at 0
]


@pytest.mark.parametrize("codec,ext,rate,num_frames,gop,num_b_frames", CLIPS)
def test_seeking_returns_the_sequential_frames(tmp_path, codec, ext, rate, num_frames, gop, num_b_frames):
    """Setup: clips of several codecs, containers, odd frame counts and rates, short and long GOPs.
    Expect: the seeking decode returns the sequential decode's indices and pixels; the frames differ
    from one another (the comparison is not vacuous); fewer frames are decoded where sampled frames
    are more than a GOP apart."""
    path = _write(tmp_path / f"clip.{ext}", codec, num_frames, rate, gop, num_b_frames)
    sequential, seeking = _assert_same_frames(path)
    assert seeking.indices == sample_frame_indices(num_frames, float(rate))
    assert len({np.asarray(f).tobytes() for f in seeking.frames}) == len(set(seeking.indices))
    assert seeking.num_seeks >= 1  # the seeking path ran (a fallback reports 0)
    if min(np.diff(sorted(set(seeking.indices)))) > gop + 8:  # the plan seeks past whole GOPs
        assert seeking.num_frames_decoded < sequential.num_frames_decoded
    assert [np.asarray(f).tobytes() for f in load_video(path)[0]] == [np.asarray(f).tobytes() for f in seeking.frames]


OPEN_GOPS = [  # codec, container, encoder options
    ("mpeg4", "mp4", None),
    ("mpeg2video", "mkv", None),
    ("libx264", "mp4", {"x264-params": "open-gop=1:keyint=12:min-keyint=12:scenecut=0"}),
    ("libx265", "mkv", {"x265-params": "keyint=12:min-keyint=12:scenecut=0:open-gop=1:log-level=none"}),
]


@pytest.mark.parametrize("codec,ext,options", OPEN_GOPS)
def test_seeks_into_open_gops(tmp_path, codec, ext, options):
    """Setup: 2 B-frames and a key frame every 12, open GOPs: the B-frames shown just before a key
    frame are decoded after it and refer to the GOP before. Each position around each key frame is
    decoded alone (a seek to the key frame at or before it, so a B-frame just before a key frame
    comes from a decode started at the previous one).
    Expect: every frame equals the same position of a full decode from the start."""
    path = _write(tmp_path / f"open.{ext}", codec, 60, Fraction(30), 12, 2, options=options)
    with av.open(path) as container:
        reference = [np.asarray(f.to_image().convert("RGB")) for f in container.decode(video=0)]
    with av.open(path) as container:
        decode_order = [p.pts for p in container.demux(video=0) if p.size]
    with av.open(path) as container:
        stream = container.streams.video[0]
        timeline = read_timeline(container, stream, max_packets=1000)
        keys = timeline.key_positions
        assert len(keys) >= 4
        first_key_packet = decode_order.index(timeline.pts[keys[1]])
        assert min(decode_order[first_key_packet:]) < timeline.pts[keys[1]]  # leading B-frames exist
        for key in keys[1:]:
            for target in range(key - 2, min(key + 3, len(reference))):
                runs = plan_runs([target], keys, min_skip=0)
                kept, _, num_seeks = decode_runs(container, stream, timeline, runs, max_decoded=1000)
                assert num_seeks == 1 and runs[0].start == (key if target >= key else keys[keys.index(key) - 1])
                assert np.array_equal(np.asarray(kept[target]), reference[target]), (key, target)


def test_variable_frame_rate(tmp_path):
    """Setup: an H.264 MKV whose frame durations cycle through 20, 50, 33, 100 and 10 ms.
    Expect: the same frames as the sequential decode, found through seeks."""
    path = _write(tmp_path / "vfr.mkv", "libx264", 150, Fraction(30), 10, 2, durations_ms=[20, 50, 33, 100, 10])
    with av.open(path) as container:
        stamps = sorted(p.pts for p in container.demux(video=0) if p.size)
    assert len(set(np.diff(stamps))) > 2  # really variable
    _, seeking = _assert_same_frames(path)
    assert seeking.num_seeks >= 2


def test_clip_with_an_audio_track(tmp_path):
    """Setup: an MP4 holding H.264 video (key frame every 10) and an AAC audio track interleaved.
    Expect: the same frames as the sequential decode, found through seeks on the video stream."""
    if not (_encodable("libx264") and _encodable("aac")):
        pytest.skip("this PyAV build cannot encode libx264 and aac")
    path = str(tmp_path / "talk.mp4")
    with av.open(path, "w") as out:
        video = out.add_stream("libx264", rate=30)
        video.width, video.height, video.pix_fmt, video.gop_size = 64, 48, "yuv420p", 10
        audio = out.add_stream("aac", rate=48000)
        num_samples = 0
        for i, frame in enumerate([*_frames(240), None]):
            out.mux(video.encode(frame))
            while frame is not None and num_samples < 1600 * (i + 1):  # 48 kHz beside 30 fps
                sound = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="flt", layout="mono")
                sound.sample_rate, sound.pts = 48000, num_samples
                num_samples += 1024
                out.mux(audio.encode(sound))
        out.mux(audio.encode())
    _, seeking = _assert_same_frames(path)
    assert seeking.num_seeks >= 2


def test_short_clip_repeats_frames(tmp_path):
    """Setup: 1 s at 30 fps, whose sampled indices repeat (0, 0, 10, 20).
    Expect: four frames, the first two identical, the same as sequentially."""
    path = _write(tmp_path / "short.mp4", "mpeg4", 30, Fraction(30), 5, 0)
    _, seeking = _assert_same_frames(path)
    assert seeking.indices == [0, 0, 10, 20]
    assert np.array_equal(np.asarray(seeking.frames[0]), np.asarray(seeking.frames[1]))


def test_long_clip_decodes_far_fewer_frames(tmp_path):
    """Setup: 30 s at 30 fps with a key frame every 30 frames.
    Expect: the same 16 frames; seeking decodes under half the frames the sequential decode does."""
    path = _write(tmp_path / "long.mp4", "mpeg4", 900, Fraction(30), 30, 2)
    sequential, seeking = _assert_same_frames(path)
    assert len(seeking.indices) == 16
    assert sequential.num_frames_decoded >= seeking.indices[-1] + 1
    assert seeking.num_frames_decoded < 0.5 * sequential.num_frames_decoded


def test_stream_not_starting_on_a_key_frame_falls_back(tmp_path):
    """Setup: an H.264 MP4 whose first packet (its key frame) was left out, so the decoder drops the
    frames before the next key frame and the packets no longer number the decoded frames.
    Expect: the seeking decode falls back to the sequential one (no seek) and gives its frames."""
    path = _write(tmp_path / "nokey.mp4", "libx264", 95, Fraction(30), 10, 2, skip_packets=1)
    sequential, seeking = _assert_same_frames(path)
    assert seeking.num_seeks == 0
    assert seeking.num_frames_decoded >= sequential.num_frames_decoded


def test_truncated_stream_samples_what_decodes(tmp_path):
    """Setup: a WebM cut to 60 % of its bytes: its header still states the whole duration.
    Expect: both decodes sample the frames that remain, identically, the seeking one without falling back."""
    path = _write(tmp_path / "full.webm", "libvpx-vp9", 95, Fraction(30), 10, 0)
    cut = tmp_path / "cut.webm"
    data = open(path, "rb").read()
    cut.write_bytes(data[: int(len(data) * 0.6)])
    _, seeking = _assert_same_frames(str(cut))
    assert seeking.indices[-1] < 90  # fewer than the header's 95 frames were sampled from
    assert seeking.num_seeks >= 1  # found by seeking, not by the fallback


def test_frame_limit_counts_frames_decoded(tmp_path):
    """Setup: 900 frames, key frame every 30; --max_video_frames_decoded 600, then 100.
    Expect: at 600 the seeking decode is accepted (it plans about 320 frames) while the sequential one
    is refused from the container's 900; at 100 both are refused, naming the flag."""
    path = _write(tmp_path / "long.mp4", "mpeg4", 900, Fraction(30), 30, 0)
    decoded = decode_container(path, MediaLimits(max_video_frames_decoded=600))
    assert decoded.num_seeks > 0 and decoded.num_frames_decoded <= 600
    with pytest.raises(MediaLimitError, match="max_video_frames_decoded"):
        decode_container(path, MediaLimits(max_video_frames_decoded=600), seek=False)
    for seek in (True, False):
        with pytest.raises(MediaLimitError, match="max_video_frames_decoded"):
            decode_container(path, MediaLimits(max_video_frames_decoded=100), seek=seek)


def test_errors_are_as_before(tmp_path):
    """Setup: a missing file and a file of garbage with a video extension.
    Expect: FileNotFoundError and a ValueError naming the file, from both decodes."""
    (tmp_path / "bad.mkv").write_bytes(b"\x1aE\xdf\xa3 not really matroska" * 50)
    for seek in (True, False):
        with pytest.raises(FileNotFoundError, match="nope.mp4"):
            decode_container(str(tmp_path / "nope.mp4"), seek=seek)
        with pytest.raises(ValueError, match="bad.mkv"):
            decode_container(str(tmp_path / "bad.mkv"), seek=seek)


def test_plan_keeps_decoding_when_the_next_key_frame_is_close():
    """Setup: key frames every 10 positions; targets close together and far apart.
    Expect: a target whose key frame is within 8 frames of the previous target joins its decode;
    one further away starts a new decode at its key frame."""
    keys = list(range(0, 200, 10))
    runs = plan_runs([0, 5, 12, 15, 50, 57, 150], keys)
    assert runs == [DecodeRun(0, [0, 5, 12, 15]), DecodeRun(50, [50, 57]), DecodeRun(150, [150])]
    assert plan_runs([3, 40], [0]) == [DecodeRun(0, [3, 40])]  # one key frame: one decode
