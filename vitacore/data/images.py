"""Images for the vision tower: decoding, pad-to-square, resize and normalization (PIL, no torchvision).

LLaVA's recipe: an optional pad to a square with the mean colour, a bicubic resize to the tower's
size, then per-channel normalization with the tower's own mean and std (:class:`ImageSpec`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Tuple, Union

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

__all__ = ["ImageSpec", "ImageTransform", "expand_to_square", "load_image", "pad_colour"]

PathLike = Union[str, "os.PathLike[str]"]


@dataclass(frozen=True)
class ImageSpec:
    """What a vision tower expects: square images of ``image_size`` normalized with ``mean`` / ``std``."""

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def load_image(path: PathLike) -> Image.Image:
    """Loads an image file as an RGB PIL image.

    Args:
        path: Image file path.

    Returns:
        The fully decoded image in RGB mode.

    Raises:
        FileNotFoundError: If no file exists at ``path``.
        ValueError: If the file is not a readable image (corrupt, truncated or
            an unsupported format).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        with Image.open(path) as img:
            # load() forces a full decode here, so truncated files fail now
            # with a clear message rather than later inside a data worker.
            img.load()
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ValueError(f"{path} is not a readable image: {exc}") from exc


def pad_colour(mean: Tuple[float, float, float]) -> Tuple[int, int, int]:
    """The fill colour of ``--image_aspect_ratio pad``: the processor's mean colour, truncated as VITA does."""
    return tuple(int(m * 255) for m in mean)


def expand_to_square(img: Image.Image, fill: Tuple[int, int, int]) -> Image.Image:
    """Pads the shorter side symmetrically with ``fill`` so the content keeps its aspect."""
    width, height = img.size
    if width == height:
        return img
    side = max(width, height)
    canvas = Image.new(img.mode, (side, side), fill)
    canvas.paste(img, ((side - width) // 2, (side - height) // 2))
    return canvas


@dataclass
class ImageTransform:
    """Turns a PIL image into a normalized ``(3, S, S)`` float tensor.

    Attributes:
        image_size: Output side length ``S`` in pixels.
        mean: Per-channel mean in [0, 1] (RGB order).
        std: Per-channel standard deviation (RGB order).
        pad_to_square: If True, pad the image to a square with the mean
            colour before resizing (LLaVA's ``expand2square``), so the
            content is not stretched.
    """

    image_size: int
    mean: tuple
    std: tuple
    pad_to_square: bool = False

    def __post_init__(self) -> None:
        if self.image_size <= 0:
            raise ValueError(f"image_size must be positive, got {self.image_size}")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError("mean and std must each have 3 (RGB) entries")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std entries must be positive, got {self.std}")
        self.mean = tuple(float(m) for m in self.mean)
        self.std = tuple(float(s) for s in self.std)

    def __call__(self, img: Union[Image.Image, PathLike]) -> torch.Tensor:
        """Applies the transform.

        Args:
            img: A PIL image, or a path to load with :func:`load_image`.

        Returns:
            A float32 tensor of shape ``(3, image_size, image_size)``.
        """
        if not isinstance(img, Image.Image):
            img = load_image(img)
        elif img.mode != "RGB":
            img = img.convert("RGB")
        if self.pad_to_square:
            img = expand_to_square(img, pad_colour(self.mean))
        size = (self.image_size, self.image_size)
        if img.size != size:
            img = img.resize(size, resample=Image.Resampling.BICUBIC)
        pixels = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
        mean = torch.tensor(self.mean, dtype=torch.float32).view(3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(3, 1, 1)
        return ((pixels - mean) / std).contiguous()
