"""Images for the vision tower: decoding, pad-to-square, resize and normalization (PIL, no torchvision).

LLaVA's recipe: an optional pad to a square with the mean colour, a bicubic resize to the tower's
size, then per-channel normalization with the tower's own mean and std (:class:`ImageSpec`).
"""

from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass
from typing import Optional, Tuple, Union

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from vitacore.data.media_limits import MediaLimitError, MediaLimits

__all__ = ["ImageSpec", "ImageTransform", "expand_to_square", "image_size_from_header", "load_image", "open_image",
           "pad_colour"]

PathLike = Union[str, "os.PathLike[str]"]


@dataclass(frozen=True)
class ImageSpec:
    """What a vision tower expects: square images of ``image_size`` normalized with ``mean`` / ``std``."""

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def open_image(path: str, limits: MediaLimits) -> Image.Image:
    """Opens an image file, reading its header only, and checks it against ``limits`` before any decoding.

    Pillow's own decompression-bomb guard (a warning, then an error at twice its threshold) is folded
    into ``--max_image_pixels``: the flag decides, and a refusal is a bad sample rather than a crash.

    Returns:
        The opened, not yet decoded image (close it, e.g. with ``with``).

    Raises:
        MediaLimitError: more pixels than ``max_image_pixels``, or more frames than ``max_animation_frames``.
        OSError, UnidentifiedImageError, ValueError: not a readable image.
    """
    if Image.MAX_IMAGE_PIXELS is not None and limits.max_image_pixels > Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = limits.max_image_pixels  # a raised flag must not be refused by Pillow
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the flag's check below decides
        try:
            img = Image.open(path)
        except Image.DecompressionBombError as err:
            raise _bomb(path, err, limits) from None
        try:
            limits.check("max_image_pixels", img.width * img.height, "pixels", path)
            # GIF / WebP / APNG frame counts come from the container's blocks, not from decoding frames.
            limits.check("max_animation_frames", getattr(img, "n_frames", 1), "frames (an animated image)", path)
        except Image.DecompressionBombError as err:  # a GIF frame larger than its canvas
            img.close()
            raise _bomb(path, err, limits) from None
        except BaseException:
            img.close()
            raise
    return img


def _bomb(path: str, err: Exception, limits: MediaLimits) -> MediaLimitError:
    """Pillow's decompression-bomb error as a limit error, with the pixel count its message states."""
    stated = re.search(r"\((\d+) pixels\)", str(err))
    try:
        limits.check("max_image_pixels", int(stated.group(1)) if stated else limits.max_image_pixels + 1,
                     "pixels", path)
    except MediaLimitError as refused:
        return refused
    return MediaLimitError(f"media file {path}: {err} (--max_image_pixels {limits.max_image_pixels:,})", path)


def image_size_from_header(path: str) -> Optional[Tuple[int, int]]:
    """``(width, height)`` from the file's header (nothing decoded, no limit applied); None if unreadable."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(path) as img:
                return img.size
        except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError):
            return None


def load_image(path: PathLike, limits: Optional[MediaLimits] = None) -> Image.Image:
    """Loads an image file as an RGB PIL image, refusing it before decoding when over ``limits``.

    Args:
        path: Image file path.
        limits: the run's media limits (None: the defaults).

    Returns:
        The fully decoded image in RGB mode.

    Raises:
        FileNotFoundError: If no file exists at ``path``.
        MediaLimitError: more pixels (or animation frames) than ``limits`` allow.
        ValueError: If the file is not a readable image (corrupt, truncated or
            an unsupported format).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        with open_image(path, limits or MediaLimits()) as img:
            # load() forces a full decode here, so truncated files fail now
            # with a clear message rather than later inside a data worker.
            img.load()
            return img.convert("RGB")
    except MediaLimitError:
        raise
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
