"""Video decode time: seeking to the key frames before the sampled frames vs decoding from the start.

One process encodes a long synthetic clip (default 2 minutes at 30 fps, 640x360, H.264 through
PyAV's bundled libx264) once per key-frame interval in ``--gops``, then, for ``--rounds`` rounds,
alternating which goes first, times ``vitacore.data.video.decode_container`` on it with
``seek=False`` (today's sequential decode) and ``seek=True``. Both must return the same frame
indices and pixels (checked every round). It prints, per interval, the median time of each side,
the frames each decoded and the ratio sequential / seeking.

    python bench/video_seek.py [--seconds 120] [--fps 30] [--width 640] [--height 360] [--gops 60,250]
                               [--rounds 3] [--codec libx264] [--preset veryfast]

Encoding takes longer than the measurement (about a minute per interval at the defaults on 2 cores).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from fractions import Fraction

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from vitacore.data.video import decode_container  # noqa: E402


def parse(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=120.0, help="clip length")
    parser.add_argument("--fps", type=int, default=30, help="clip frame rate")
    parser.add_argument("--width", type=int, default=640, help="frame width (even)")
    parser.add_argument("--height", type=int, default=360, help="frame height (even)")
    parser.add_argument("--gops", default="60,250", help="comma-separated key-frame intervals, in frames")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; each times both sides once")
    parser.add_argument("--codec", default="libx264", help="PyAV encoder")
    parser.add_argument("--preset", default="veryfast", help="encoder preset (libx264 / libx265)")
    args = parser.parse_args(argv)
    args.gops = [int(g) for g in args.gops.split(",") if g]
    if min([args.rounds, args.fps, args.width, args.height, *args.gops]) < 1 or args.seconds <= 0:
        parser.error("every count must be >= 1 and --seconds > 0")
    return args


def write_clip(path: str, args: argparse.Namespace, gop: int) -> int:
    """Encodes a moving textured pattern (so inter frames carry real residuals); returns its frame count."""
    import av

    num_frames = int(round(args.seconds * args.fps))
    h, w = args.height, args.width
    yy, xx = np.mgrid[0:h, 0:w]
    texture = np.random.default_rng(0).integers(0, 24, (h, 2 * w, 3), dtype=np.uint8)
    with av.open(path, "w") as out:
        stream = out.add_stream(args.codec, rate=Fraction(args.fps))
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.gop_size = gop
        if args.codec in ("libx264", "libx265"):
            stream.options = {"preset": args.preset, "sc_threshold": "0"}  # key frames every gop frames only
        for i in range(num_frames):
            image = np.empty((h, w, 3), np.uint8)
            image[..., 0] = (xx + 3 * i) % 256
            image[..., 1] = (yy + 2 * i) % 256
            image[..., 2] = (xx // 2 + yy // 2 + i) % 256
            shift = (4 * i) % w
            image += texture[:, shift:shift + w]
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return num_frames


def timed(path: str, seek: bool):
    started = time.perf_counter()
    decoded = decode_container(path, seek=seek)
    return time.perf_counter() - started, decoded


def main(argv=None) -> int:
    args = parse(argv)
    started = time.time()
    with tempfile.TemporaryDirectory() as folder:
        for gop in args.gops:
            path = os.path.join(folder, f"clip_gop{gop}.mp4")
            t0 = time.time()
            num_frames = write_clip(path, args, gop)
            print(f"key frame every {gop} frames: encoded {num_frames} frames {args.width}x{args.height} "
                  f"@ {args.fps} fps ({os.path.getsize(path) / 2 ** 20:.1f} MiB) in {time.time() - t0:.0f}s")
            seconds = {True: [], False: []}
            stats = {}
            for round_index in range(args.rounds):
                order = (False, True) if round_index % 2 == 0 else (True, False)
                results = {}
                for seek in order:
                    elapsed, results[seek] = timed(path, seek)
                    seconds[seek].append(elapsed)
                    stats[seek] = results[seek]
                seq, sk = results[False], results[True]
                same = seq.indices == sk.indices and all(
                    np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(seq.frames, sk.frames))
                if not same:
                    print("ERROR: seeking returned other frames than the sequential decode")
                    return 1
                print(f"  round {round_index + 1}: sequential {seconds[False][-1]:6.2f}s   "
                      f"seeking {seconds[True][-1]:6.2f}s   ratio {seconds[False][-1] / seconds[True][-1]:5.2f}")
            seq_s, seek_s = statistics.median(seconds[False]), statistics.median(seconds[True])
            print(f"  sequential: {seq_s:.2f}s, {stats[False].num_frames_decoded} frames decoded")
            print(f"  seeking:    {seek_s:.2f}s, {stats[True].num_frames_decoded} frames decoded, "
                  f"{stats[True].num_seeks} seeks, {len(stats[True].indices)} frames sampled")
            print(f"  ratio sequential / seeking decode time (gop {gop}): {seq_s / seek_s:.2f} "
                  f"(median of {args.rounds} rounds); frames decoded "
                  f"{stats[False].num_frames_decoded / stats[True].num_frames_decoded:.2f}x fewer")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"(total wall time {time.time() - started:.0f}s; {os.cpu_count()} CPUs, "
          f"1-min load average at the end {load:.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
