"""Dynamic image tiling, VITA-1.5's InternVL-style rule, applied whatever ``--image_aspect_ratio`` says
(as in VITA; ``pad`` pads the image to a square first, ``--max_dynamic_patch 1`` turns tiling off).

An image is resized to a grid of ``cols x rows`` square tiles whose aspect ratio is closest to
the image's, with ``min_tiles <= cols * rows <= max_tiles``, and cut into tiles row by row. When
more than one tile results, a thumbnail (the whole original image at tile size) is appended so the
model also sees the global view. Each tile is one image for the vision tower, so one ``<image>``
in the text stands for as many image blocks as tiles (see :func:`vitacore.data.turns.prepare_turns`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import torch
from PIL import Image

from vitacore.constants import DEFAULT_IMAGE_TOKEN
from vitacore.data.images import expand_to_square, image_size_from_header

__all__ = ["ImageTiler", "expand_placeholders", "num_tiles", "tile_grid", "tile_image"]


def _candidate_grids(min_tiles: int, max_tiles: int) -> list[tuple[int, int]]:
    """All ``(cols, rows)`` with ``min_tiles <= cols * rows <= max_tiles``, smallest area first."""
    grids = [(cols, rows) for cols in range(1, max_tiles + 1) for rows in range(1, max_tiles + 1)
             if min_tiles <= cols * rows <= max_tiles]
    return sorted(grids, key=lambda g: (g[0] * g[1], g[0]))


def tile_grid(width: int, height: int, min_tiles: int, max_tiles: int, tile_size: int) -> tuple[int, int]:
    """The ``(cols, rows)`` grid for a ``width x height`` image.

    The grid whose aspect ratio ``cols / rows`` is closest to ``width / height`` wins. On a tie the
    larger grid (candidates are visited smallest first) replaces the current choice only when the
    image has more than half the pixels of that grid at ``tile_size``: upscaling a small image
    into many tiles adds no detail.

    Args:
        width: image width in pixels.
        height: image height in pixels.
        min_tiles: fewest tiles (``--min_dynamic_patch``).
        max_tiles: most tiles (``--max_dynamic_patch``).
        tile_size: tile side in pixels (the vision tower's input size).

    Returns:
        ``(cols, rows)``.

    Raises:
        ValueError: bad sizes or tile bounds.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if not 1 <= min_tiles <= max_tiles:
        raise ValueError(f"need 1 <= min_tiles <= max_tiles, got {min_tiles}..{max_tiles}")
    aspect = width / height
    area = width * height
    best, best_diff = (1, 1), float("inf")
    for cols, rows in _candidate_grids(min_tiles, max_tiles):
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and area > 0.5 * tile_size * tile_size * cols * rows:
            best = (cols, rows)
    return best


def num_tiles(width: int, height: int, min_tiles: int, max_tiles: int, tile_size: int,
              use_thumbnail: bool = True) -> int:
    """How many tiles :func:`tile_image` makes of a ``width x height`` image (thumbnail included)."""
    cols, rows = tile_grid(width, height, min_tiles, max_tiles, tile_size)
    count = cols * rows
    return count + 1 if use_thumbnail and count > 1 else count


def tile_image(img: Image.Image, min_tiles: int, max_tiles: int, tile_size: int,
               use_thumbnail: bool = True) -> list[Image.Image]:
    """Cuts ``img`` into ``tile_size`` square tiles, row-major, plus a thumbnail when more than one.

    Returns:
        The tiles as PIL images, each ``tile_size x tile_size``.
    """
    cols, rows = tile_grid(img.width, img.height, min_tiles, max_tiles, tile_size)
    resized = img.resize((cols * tile_size, rows * tile_size), resample=Image.Resampling.BICUBIC)
    tiles = [resized.crop((c * tile_size, r * tile_size, (c + 1) * tile_size, (r + 1) * tile_size))
             for r in range(rows) for c in range(cols)]
    if use_thumbnail and len(tiles) > 1:
        # From the original, not the resized grid: one fewer resampling step.
        tiles.append(img.resize((tile_size, tile_size), resample=Image.Resampling.BICUBIC))
    return tiles


@dataclass
class ImageTiler:
    """Tiling settings of a run, applied before the per-tile :class:`~vitacore.data.images.ImageTransform`.

    Attributes:
        tile_size: tile side in pixels (the vision tower's input size).
        min_tiles: fewest grid tiles per image.
        max_tiles: most grid tiles per image.
        use_thumbnail: append a whole-image thumbnail when an image has more than one tile.
        pad_fill: pad each image to a square of this colour before tiling (``--image_aspect_ratio pad``);
            None: tile the image as it is.
    """

    tile_size: int
    min_tiles: int = 1
    max_tiles: int = 12
    use_thumbnail: bool = True
    pad_fill: Optional[tuple[int, int, int]] = None

    def __post_init__(self) -> None:
        if self.tile_size <= 0:
            raise ValueError(f"tile_size must be positive, got {self.tile_size}")
        if not 1 <= self.min_tiles <= self.max_tiles:
            raise ValueError(f"need 1 <= min_dynamic_patch <= max_dynamic_patch, "
                             f"got {self.min_tiles} and {self.max_tiles}")

    def __call__(self, img: Image.Image, transform: Callable[[Image.Image], torch.Tensor]) -> list[torch.Tensor]:
        """The image's tiles, each through ``transform``."""
        if img.mode != "RGB":
            img = img.convert("RGB")
        if self.pad_fill is not None:
            img = expand_to_square(img, self.pad_fill)
        tiles = tile_image(img, self.min_tiles, self.max_tiles, self.tile_size, self.use_thumbnail)
        return [transform(tile) for tile in tiles]

    def count(self, width: int, height: int) -> int:
        """Tiles for an image of this size (thumbnail included)."""
        if self.pad_fill is not None:
            width = height = max(width, height)
        return num_tiles(width, height, self.min_tiles, self.max_tiles, self.tile_size, self.use_thumbnail)

    def count_from_header(self, path: str) -> int:
        """Tiles for the image file at ``path``, from its header only (PIL decodes pixels lazily).

        An unreadable or missing file (or a decompression bomb) counts one tile: ``__getitem__``
        reports the file; here only a plausible length is needed.
        """
        size = image_size_from_header(path)
        return self.count(*size) if size else 1


def expand_placeholders(conversations: Iterable[dict], placeholder: str, counts: list[int],
                        missing: int, suffix: str = "") -> list[dict]:
    """Replace the k-th ``placeholder`` (reading order) with ``counts[k]`` ``<image>`` placeholders and ``suffix``.

    ``missing`` is used past the end of ``counts``; the caller checks placeholders and media match.
    """
    remaining = iter(counts)
    expanded = []
    for turn in conversations:
        pieces = turn["value"].split(placeholder)
        value = pieces[0]
        for piece in pieces[1:]:
            value += DEFAULT_IMAGE_TOKEN * next(remaining, missing) + suffix + piece
        expanded.append({**turn, "value": value})
    return expanded
