"""Tests for vitacore.data.tiling: grid choice, tiles, placeholder expansion, lengths and merge."""

import json

import pytest
import torch
import torch.nn as nn
from PIL import Image

from vitacore.config import parse_args
from vitacore.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from vitacore.data import DataSpec, ModelInputs, build_data
from vitacore.data.conversation import QWEN2P5_INSTRUCT
from vitacore.data.dataset import Collator, VitaJsonDataset
from vitacore.data.images import ImageSpec, ImageTransform
from vitacore.data.tiling import ImageTiler, num_tiles, tile_grid, tile_image
from vitacore.data.turns import prepare_turns
from vitacore.demo.tokenizer import build_tokenizer
from vitacore.model.merge import merge_media_embeddings

T = 448


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.mark.parametrize("size, bounds, grid", [
    ((448, 448), (1, 12), (1, 1)),      # square, small: a tie with 2x2 stays at 1x1 (too few pixels)
    ((896, 896), (1, 12), (2, 2)),      # square, enough pixels for 2x2 but not for 3x3
    ((1344, 1344), (1, 12), (3, 3)),
    ((896, 448), (1, 12), (2, 1)),      # 2:1 -> 2 columns, 1 row
    ((100, 300), (1, 12), (1, 3)),      # 1:3 -> 1 column, 3 rows
    ((1000, 10), (1, 12), (12, 1)),     # extreme: the widest grid allowed
    ((640, 480), (1, 12), (4, 3)),      # 4:3, the exact ratio
    ((448, 448), (2, 12), (2, 2)),      # min 2 excludes 1x1; 2x2 is the closest square grid
    ((896, 448), (1, 1), (1, 1)),       # max 1: always one tile
    ((1000, 500), (1, 6), (2, 1)),      # a tie with 4x2 is out of range (8 > 6)
])
def test_grid_choice(size, bounds, grid):
    assert tile_grid(*size, *bounds, T) == grid


def test_grid_tie_goes_to_larger_grid_only_with_enough_pixels():
    # 2:1 at 4x2 needs more than half of 8 tiles' pixels (4 * 448^2 = 802816).
    assert tile_grid(1792, 896, 1, 12, T) == (4, 2)
    assert tile_grid(1266, 633, 1, 12, T) == (2, 1)  # 801378 pixels


@pytest.mark.parametrize("bad", [(0, 10, 1, 12), (10, 10, 0, 12), (10, 10, 5, 4)])
def test_grid_rejects_bad_arguments(bad):
    with pytest.raises(ValueError):
        tile_grid(*bad, T)


@pytest.mark.parametrize("size, thumbnail, count", [
    ((896, 448), True, 3), ((896, 448), False, 2),
    ((448, 448), True, 1), ((448, 448), False, 1),  # one tile: no thumbnail
    ((1344, 1344), True, 10), ((1000, 10), True, 13),
])
def test_tile_count(size, thumbnail, count):
    assert num_tiles(*size, 1, 12, T, use_thumbnail=thumbnail) == count
    img = Image.new("RGB", size)
    tiles = tile_image(img, 1, 12, T, use_thumbnail=thumbnail)
    assert len(tiles) == count
    assert all(t.size == (T, T) for t in tiles)


def test_tiles_are_row_major_and_thumbnail_is_whole_image():
    img = Image.new("RGB", (32, 32))
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]  # TL, TR, BL, BR
    for k, colour in enumerate(colours):
        img.paste(colour, ((k % 2) * 16, (k // 2) * 16, (k % 2) * 16 + 16, (k // 2) * 16 + 16))
    tiles = tile_image(img, 1, 12, 16)
    assert len(tiles) == 5
    assert [t.getpixel((8, 8)) for t in tiles[:4]] == colours
    thumb = tiles[4]
    assert [thumb.getpixel(xy) for xy in ((2, 2), (13, 2), (2, 13), (13, 13))] == colours


def test_each_image_placeholder_gets_its_own_tile_count_and_one_newline():
    conv = [{"from": "human", "value": "<image>\nA<image>B"}, {"from": "gpt", "value": "x"},
            {"from": "human", "value": "<image>"}, {"from": "gpt", "value": "y"}]
    out, _ = prepare_turns(conv, None, [3, 1, 2], [])
    # VITA would give the second <image> of the first turn that turn's first count (3); vitacore its own.
    assert [t["value"] for t in out] == ["<image><image><image>\nA<image>\nB", "x", "<image><image>\n", "y"]
    assert conv[0]["value"] == "<image>\nA<image>B"  # input untouched


def _png(path, size, colour=(10, 200, 30)):
    Image.new("RGB", size, colour).save(path)
    return path.name


def _dataset(tmp_path, tok, records, tiler, tokens_per_image=None):
    return VitaJsonDataset(records, str(tmp_path), tok, QWEN2P5_INSTRUCT,
                           ImageTransform(16, (0.5,) * 3, (0.5,) * 3), None,
                           tokens_per_image=tokens_per_image, image_tiler=tiler)


def _two_image_record(tmp_path):
    # 2:1 -> 2 tiles + thumbnail; square 16x16 -> 1 tile.
    wide, small = _png(tmp_path / "wide.png", (32, 16)), _png(tmp_path / "sq.png", (16, 16))
    return {"id": "r", "image": [wide, small],
            "conversations": [{"from": "human", "value": "<image>\nand <image>\nCompare."},
                              {"from": "gpt", "value": "Same colour."}]}


def test_dataset_expands_each_image_to_its_tiles(tmp_path, tok):
    sample = _dataset(tmp_path, tok, [_two_image_record(tmp_path)], ImageTiler(16))[0]
    assert len(sample.images) == 4
    assert all(image.shape == (3, 16, 16) for image in sample.images)
    ids = sample.input_ids
    assert ids.count(IMAGE_TOKEN_INDEX) == len(sample.images)
    first = ids.index(IMAGE_TOKEN_INDEX)
    assert ids[first:first + 3] == [IMAGE_TOKEN_INDEX] * 3 and ids[first + 3] != IMAGE_TOKEN_INDEX
    assert all(label == IGNORE_INDEX for token, label in zip(ids, sample.labels) if token < 0)


def test_without_tiler_one_image_per_placeholder(tmp_path, tok):
    sample = _dataset(tmp_path, tok, [_two_image_record(tmp_path)], None)[0]
    assert len(sample.images) == 2 and sample.input_ids.count(IMAGE_TOKEN_INDEX) == 2


def test_placeholder_mismatch_still_reported_with_tiling(tmp_path, tok):
    record = _two_image_record(tmp_path)
    record["conversations"][0]["value"] = "<image> only one"
    with pytest.raises(ValueError, match="placeholder"):
        _dataset(tmp_path, tok, [record], ImageTiler(16))[0]


def test_modality_lengths_count_tiles(tmp_path, tok):
    per_tile = 5
    dataset = _dataset(tmp_path, tok, [_two_image_record(tmp_path)], ImageTiler(16), tokens_per_image=per_tile)
    sample = dataset[0]
    text = sum(1 for i in sample.input_ids if i >= 0)
    assert dataset.modality_lengths == [text + 4 * per_tile]


def test_merge_with_tiled_images(tmp_path, tok):
    sample = _dataset(tmp_path, tok, [_two_image_record(tmp_path)], ImageTiler(16))[0]
    batch = Collator(tok.pad_token_id)([sample])
    assert batch["images"].shape == (4, 3, 16, 16)
    torch.manual_seed(0)
    embed = nn.Embedding(len(tok), 4)
    per_tile = 3
    blocks = [torch.full((per_tile, 4), float(k)) for k in range(4)]
    with torch.no_grad():
        out = merge_media_embeddings(batch["input_ids"], batch["labels"], batch["attention_mask"], embed,
                                     blocks, [], 4096)
    ids = sample.input_ids
    text = [i for i in ids if i >= 0]
    assert out.inputs_embeds.shape == (1, len(text) + 4 * per_tile, 4)
    first = ids.index(IMAGE_TOKEN_INDEX)
    # Three tiles of the first image back to back, then the text between, then the second image.
    torch.testing.assert_close(out.inputs_embeds[0, first:first + 3 * per_tile], torch.cat(blocks[:3]))
    second = ids.index(IMAGE_TOKEN_INDEX, first + 3) + 3 * (per_tile - 1)
    torch.testing.assert_close(out.inputs_embeds[0, second:second + per_tile], blocks[3])
    torch.testing.assert_close(out.inputs_embeds[0, :first], embed.weight[ids[:first]].detach())
    assert out.labels[0, first:first + 3 * per_tile].eq(IGNORE_INDEX).all()


def test_config_accepts_dynamic_and_checks_patch_bounds():
    cfg = parse_args(["--image_aspect_ratio", "dynamic", "--min_dynamic_patch", "2", "--max_dynamic_patch", "6"])
    assert (cfg.data.image_aspect_ratio, cfg.data.min_dynamic_patch, cfg.data.max_dynamic_patch) == ("dynamic", 2, 6)
    with pytest.raises(ValueError, match="min_dynamic_patch"):
        parse_args(["--min_dynamic_patch", "5", "--max_dynamic_patch", "4"])


def test_build_data_with_dynamic_tiling_on_the_embedded_default(vitacore_cache, tmp_path):
    import vitacore

    config = vitacore.RunConfig()
    config.stage = "4"
    config.set("image_aspect_ratio", "dynamic", "flag")
    config.set("max_dynamic_patch", 4, "flag")
    config.set("output_dir", str(tmp_path), "flag")
    recipe = vitacore.StageRecipe(config)  # stage 4's preset on the embedded default; validated
    recipe.build_parts()
    bundle = recipe.bundle
    train = recipe.data.train
    tiler = train.image_tiler
    assert tiler is not None and tiler.tile_size == bundle.model.vision_tower.image_spec.image_size
    assert (tiler.min_tiles, tiler.max_tiles) == (1, 4)
    index = next(i for i, r in enumerate(train.records) if r.get("image"))
    sample = train[index]
    assert sample.input_ids.count(IMAGE_TOKEN_INDEX) == len(sample.images) >= 1
    text = sum(1 for i in sample.input_ids if i >= 0)
    media = len(sample.images) * train.tokens_per_image + sum(sample.audio_token_lengths)
    assert train.modality_lengths[index] == text + media


@pytest.mark.parametrize("aspect", [None, "square", "dynamic", "pad"])
def test_every_aspect_ratio_value_tiles_as_vita_does(tmp_path, tok, aspect):
    """VITA-1.5 tiles whatever --image_aspect_ratio says (its scripts pass 'square'); 'pad' pads to a
    square of the mean colour first, so a 2:1 image becomes a square grid of the padded image."""
    Image.new("RGB", (32, 16), (10, 200, 30)).save(tmp_path / "wide.png")
    record = {"id": "w", "image": "wide.png", "conversations": [{"from": "human", "value": "<image>\nColour?"},
                                                                {"from": "gpt", "value": "green"}]}
    (tmp_path / "train.json").write_text(json.dumps([record]))
    mean = (0.48145466, 0.4578275, 0.40821073)  # CLIP's: int() and round() give different fills
    inputs = ModelInputs(image_spec=ImageSpec(16, mean, (0.5, 0.5, 0.5)), tokens_per_image=4)
    spec = DataSpec(data_path=str(tmp_path / "train.json"), image_aspect_ratio=aspect)
    train = build_data(spec, tok, inputs).train
    sample = train[0]
    if aspect == "pad":
        # 32x32 after padding: a 1:1 tie between 1x1 and 2x2, and 1024 px > half of 2x2's 1024 -> 2x2 + thumbnail.
        assert train.image_tiler.pad_fill == (122, 116, 104)  # VITA: int(mean * 255), not round
        assert len(sample.images) == 5
        thumb_top_row = sample.images[4][:, 0, 0]
        expected = (torch.tensor([122, 116, 104]) / 255.0 - torch.tensor(mean)) / 0.5
        torch.testing.assert_close(thumb_top_row, expected, atol=1e-6, rtol=0)
    else:
        assert train.image_tiler.pad_fill is None and len(sample.images) == 3  # 2x1 grid + thumbnail
    assert sample.input_ids.count(IMAGE_TOKEN_INDEX) == len(sample.images)


def test_max_dynamic_patch_1_turns_tiling_off(tmp_path, tok):
    tiler = ImageTiler(16, 1, 1)
    tiles = tiler(Image.new("RGB", (48, 16), (1, 2, 3)), ImageTransform(16, (0.5,) * 3, (0.5,) * 3))
    assert len(tiles) == 1 and tiler.count(48, 16) == 1
