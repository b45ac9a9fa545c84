"""Deterministic synthetic demo data in VITA's JSON format.

Every answer depends on the media: the colour and shape drawn in an image, the direction a shape
moves in a video, the pitch of a tone. ``text_warmup_records`` writes the same questions with the
media replaced by the words that describe it, which is how the tiny default LLM learns to read
context before the projector learns to speak its language.
"""

from __future__ import annotations

import json
import math
import os
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from vitacore.data.audio import write_wav

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (225, 205, 40),
}
SHAPES = ("circle", "square", "triangle")
TONES = {"low": 220.0, "middle": 523.0, "high": 1244.0}
DIRECTIONS = ("left", "right")

IMAGE_QUESTION = "What is shown in the picture?"
VIDEO_QUESTION = "What happens in the video?"
AUDIO_QUESTION = "What do you hear?"
SAMPLE_RATE = 16000


@dataclass(frozen=True)
class SyntheticSizes:
    """How many records of each kind to generate."""

    num_image: int = 1200
    num_video: int = 120
    num_audio: int = 240
    num_text: int = 120
    num_neg: int = 60
    num_eval_image: int = 120
    num_eval_audio: int = 60
    image_size: int = 64
    num_video_frames: int = 4


def draw_shape(rng: random.Random, colour: str, shape: str, size: int, centre=None) -> Image.Image:
    """Draw one coloured shape on a light, slightly noisy background."""
    grey = rng.randint(200, 245)
    image = Image.new("RGB", (size, size), (grey, grey, grey))
    draw = ImageDraw.Draw(image)
    radius = rng.uniform(0.25, 0.38) * size
    if centre is None:
        centre = (rng.uniform(radius, size - radius), rng.uniform(radius, size - radius))
    cx, cy = centre
    fill = tuple(max(0, min(255, c + rng.randint(-20, 20))) for c in COLOURS[colour])
    if shape == "circle":
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=fill)
    elif shape == "square":
        draw.rectangle([cx - radius, cy - radius, cx + radius, cy + radius], fill=fill)
    else:
        corners = (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)
        points = [(cx + radius * math.cos(a), cy + radius * math.sin(a)) for a in corners]
        draw.polygon(points, fill=fill)
    return image


def tone(rng: random.Random, pitch: str, seconds: float = 0.8, noise: float = 0.02) -> np.ndarray:
    """A sine tone of the named pitch with slight detune and noise, in [-1, 1]."""
    n = int(seconds * SAMPLE_RATE)
    t = np.arange(n) / SAMPLE_RATE
    freq = TONES[pitch] * rng.uniform(0.95, 1.05)
    noise_rng = np.random.default_rng(rng.randint(0, 2**31))
    wave = 0.5 * np.sin(2 * np.pi * freq * t) + noise * noise_rng.standard_normal(n)
    return np.clip(wave, -1, 1).astype(np.float32)


def _conv(question: str, answer: str) -> list[dict]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


class _Writer:
    def __init__(self, root: str, sizes: SyntheticSizes):
        self.root, self.sizes = root, sizes

    def image(self, rng, name, colour, shape) -> str:
        rel = f"images/{name}.png"
        draw_shape(rng, colour, shape, self.sizes.image_size).save(os.path.join(self.root, rel))
        return rel

    def video(self, rng, name, colour, shape, direction) -> str:
        size = self.sizes.image_size
        frames, step = [], size * 0.4 / max(1, self.sizes.num_video_frames - 1)
        start_x = size * (0.7 if direction == "left" else 0.3)
        y = rng.uniform(0.3, 0.7) * size
        frame_rng_seed = rng.randint(0, 2**31)
        for k in range(self.sizes.num_video_frames):
            x = start_x + (-step if direction == "left" else step) * k
            frames.append(draw_shape(random.Random(frame_rng_seed), colour, shape, size, centre=(x, y)))
        rel = f"videos/{name}.gif"
        frames[0].save(os.path.join(self.root, rel), save_all=True, append_images=frames[1:], duration=333, loop=0)
        return rel

    def audio(self, rng, name, samples) -> str:
        rel = f"audio/{name}.wav"
        write_wav(os.path.join(self.root, rel), samples, SAMPLE_RATE)
        return rel


def _image_records(writer, rng, count, prefix):
    records = []
    for i in range(count):
        colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        rel = writer.image(rng, f"{prefix}{i:05d}", colour, shape)
        records.append({"id": f"{prefix}{i:05d}", "image": rel,
                        "conversations": _conv(f"<image>\n{IMAGE_QUESTION}", f"a {colour} {shape}")})
    return records


def _audio_records(writer, rng, count, prefix):
    records = []
    for i in range(count):
        pitch = rng.choice(list(TONES))
        rel = writer.audio(rng, f"{prefix}{i:05d}", tone(rng, pitch))
        records.append({"id": f"{prefix}{i:05d}", "audio": [rel],
                        "conversations": _conv(f"<audio>\n{AUDIO_QUESTION}", f"a {pitch} tone")})
    return records


def generate(root: str, seed: int = 0, sizes: SyntheticSizes = SyntheticSizes()) -> dict[str, str]:
    """Write media and JSON files under ``root``; return ``{subset name: json path}``.

    Subsets: ``image``, ``video``, ``audio``, ``text``, ``neg`` (training) and ``eval_image``,
    ``eval_audio`` (held out: drawn with other seeds). Same ``seed`` and sizes give identical files.
    """
    for sub in ("images", "videos", "audio"):
        os.makedirs(os.path.join(root, sub), exist_ok=True)
    writer = _Writer(root, sizes)
    rng = random.Random(seed)
    subsets: dict[str, list] = {"image": _image_records(writer, rng, sizes.num_image, "img")}

    subsets["video"] = []
    for i in range(sizes.num_video):
        colour, shape, direction = rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.choice(DIRECTIONS)
        rel = writer.video(rng, f"vid{i:05d}", colour, shape, direction)
        subsets["video"].append({"id": f"vid{i:05d}", "video": rel,
                                 "conversations": _conv(f"<video>\n{VIDEO_QUESTION}",
                                                        f"a {colour} {shape} moving {direction}")})

    subsets["audio"] = _audio_records(writer, rng, sizes.num_audio, "aud")

    subsets["text"] = []
    for i in range(sizes.num_text):
        words = f"{rng.choice(list(COLOURS))} {rng.choice(SHAPES)}"
        subsets["text"].append({"id": f"txt{i:05d}", "conversations": _conv(f"Repeat the words: {words}", words)})

    subsets["neg"] = []
    for i in range(sizes.num_neg):
        colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        image_rel = writer.image(rng, f"neg{i:05d}", colour, shape)
        noise = (0.3 * np.random.default_rng(seed * 7919 + i).standard_normal(int(0.6 * SAMPLE_RATE))).clip(-1, 1)
        noise_rel = writer.audio(rng, f"negnoise{i:05d}", noise.astype(np.float32))
        conversations = _conv(f"<image>\n{IMAGE_QUESTION}", f"a {colour} {shape}") + _conv("<audio>", "")
        subsets["neg"].append({"id": f"neg{i:05d}", "image": image_rel, "audio": [noise_rel],
                               "inserted_id": 3, "end_tag": True, "conversations": conversations})

    subsets["eval_image"] = _image_records(writer, random.Random(seed + 10_000), sizes.num_eval_image, "evimg")
    subsets["eval_audio"] = _audio_records(writer, random.Random(seed + 20_000), sizes.num_eval_audio, "evaud")

    paths = {}
    for name, records in subsets.items():
        paths[name] = os.path.join(root, f"{name}.json")
        with open(paths[name], "w") as fh:
            json.dump(records, fh, indent=1)
    return paths


def text_warmup_records(seed: int, count: int) -> list[dict]:
    """Text-only records that put the describing words where the media would be.

    The tiny LLM trained on these learns to answer by reading the context span; stage 1 then only
    has to teach the projector to produce embeddings that read like those words.
    """
    rng = random.Random(seed)
    records = []
    for i in range(count):
        kind = rng.random()
        colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        if kind < 0.6:
            modality, conv = "image", _conv(f"{colour} {shape}\n{IMAGE_QUESTION}", f"a {colour} {shape}")
        elif kind < 0.75:
            direction = rng.choice(DIRECTIONS)
            modality = "video"
            conv = _conv(f"{colour} {shape} {direction}\n{VIDEO_QUESTION}", f"a {colour} {shape} moving {direction}")
        elif kind < 0.9:
            pitch = rng.choice(list(TONES))
            modality, conv = "audio", _conv(f"{pitch} tone\n{AUDIO_QUESTION}", f"a {pitch} tone")
        else:
            modality, conv = "lang", _conv(f"Repeat the words: {colour} {shape}", f"{colour} {shape}")
        # "modality" is not a VITA field: it selects the system prompt (and, for "audio", the ☞ state
        # token) that the media record would get.
        records.append({"id": f"warm{i:05d}", "modality": modality, "conversations": conv})
    return records
