"""Tests for vitacore.model.vision.load_vision_tower."""

import json
import os

import pytest
import torch
from transformers import Qwen2Config, SiglipVisionConfig, SiglipVisionModel

from vitacore.model.vision import SIGLIP_MEAN, SIGLIP_STD, ImageSpec, VisionTower, load_vision_tower

IMAGE_SIZE, PATCH, HIDDEN = 32, 16, 16
MEAN = [0.1, 0.2, 0.3]
STD = [0.4, 0.5, 0.6]


def _tiny_siglip(num_layers=2):
    torch.manual_seed(0)
    cfg = SiglipVisionConfig(hidden_size=HIDDEN, intermediate_size=32, num_hidden_layers=num_layers,
                             num_attention_heads=2, image_size=IMAGE_SIZE, patch_size=PATCH)
    return SiglipVisionModel(cfg).eval()


@pytest.fixture(scope="module")
def saved_tower(tmp_path_factory):
    folder = tmp_path_factory.mktemp("siglip")
    model = _tiny_siglip()
    model.save_pretrained(folder)
    with open(folder / "preprocessor_config.json", "w") as fh:
        json.dump({"image_mean": MEAN, "image_std": STD, "size": {"height": IMAGE_SIZE}}, fh)
    return folder, model


def test_load_returns_tower_with_expected_output_shape(saved_tower):
    folder, _ = saved_tower
    tower = load_vision_tower(str(folder)).eval()
    assert isinstance(tower, VisionTower)
    assert tower.hidden_size == HIDDEN
    assert tower.num_tokens_per_image == (IMAGE_SIZE // PATCH) ** 2
    with torch.no_grad():
        out = tower(torch.randn(3, 3, IMAGE_SIZE, IMAGE_SIZE))
    assert out.shape == (3, (IMAGE_SIZE // PATCH) ** 2, HIDDEN)


def test_select_layer_minus_2_equals_raw_hidden_states(saved_tower):
    folder, raw = saved_tower
    tower = load_vision_tower(str(folder)).eval()
    assert tower.select_layer == -2
    assert tower.drop_cls is False
    pixels = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad():
        expected = raw(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
        last = raw(pixel_values=pixels).last_hidden_state
        got = tower(pixels)
    torch.testing.assert_close(got, expected)
    # the selected layer is not the final output
    assert not torch.allclose(got, last)


def test_weights_loaded_from_folder(saved_tower):
    folder, raw = saved_tower
    tower = load_vision_tower(str(folder))
    for key, value in raw.state_dict().items():
        assert torch.equal(tower.encoder.state_dict()[key], value), key


def test_image_spec_read_from_preprocessor_json(saved_tower):
    folder, _ = saved_tower
    tower = load_vision_tower(str(folder))
    assert tower.image_spec == ImageSpec(image_size=IMAGE_SIZE, mean=tuple(MEAN), std=tuple(STD))
    assert tower.source == os.path.abspath(folder)


def test_image_spec_defaults_without_preprocessor_json(tmp_path):
    _tiny_siglip(num_layers=1).save_pretrained(tmp_path)
    tower = load_vision_tower(str(tmp_path))
    assert tower.image_spec.mean == SIGLIP_MEAN
    assert tower.image_spec.std == SIGLIP_STD
    assert tower.image_spec.image_size == IMAGE_SIZE


def test_torch_dtype_is_applied(saved_tower):
    folder, _ = saved_tower
    tower = load_vision_tower(str(folder), torch_dtype=torch.bfloat16)
    assert {p.dtype for p in tower.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        out = tower(torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE))  # float input is cast
    assert out.dtype == torch.bfloat16


def test_unsupported_model_type_raises_listing_supported(tmp_path):
    Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=2, num_key_value_heads=1).save_pretrained(tmp_path)
    with pytest.raises(ValueError) as err:
        load_vision_tower(str(tmp_path))
    message = str(err.value)
    assert "--vision_tower" in message
    assert "'qwen2'" in message
    for supported in ("siglip_vision_model", "clip_vision_model"):
        assert supported in message


def test_missing_folder_raises_naming_the_flag(tmp_path):
    missing = tmp_path / "no_tower_here"
    with pytest.raises(FileNotFoundError) as err:
        load_vision_tower(str(missing))
    assert "--vision_tower" in str(err.value)
    assert "no_tower_here" in str(err.value)


def test_drop_cls_removes_first_token():
    raw = _tiny_siglip(num_layers=1)
    spec = ImageSpec(IMAGE_SIZE, SIGLIP_MEAN, SIGLIP_STD)
    keep = VisionTower(raw, -1, False, spec, "x")
    drop = VisionTower(raw, -1, True, spec, "x")
    pixels = torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad():
        full, cut = keep(pixels), drop(pixels)
    torch.testing.assert_close(cut, full[:, 1:])


def test_clip_tower_takes_layer_minus_2_without_cls_and_clip_defaults(tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from vitacore.model.vision import CLIP_MEAN, CLIP_STD

    torch.manual_seed(0)
    raw = CLIPVisionModel(CLIPVisionConfig(hidden_size=HIDDEN, intermediate_size=32, num_hidden_layers=2,
                                           num_attention_heads=2, image_size=IMAGE_SIZE, patch_size=PATCH)).eval()
    raw.save_pretrained(tmp_path)
    tower = load_vision_tower(str(tmp_path)).eval()
    assert (tower.select_layer, tower.drop_cls, tower.pixel_shuffle) == (-2, True, False)
    assert tower.num_tokens_per_image == (IMAGE_SIZE // PATCH) ** 2
    assert tower.encoder_tokens_per_image == (IMAGE_SIZE // PATCH) ** 2 + 1  # the CLS token runs too
    assert (tower.image_spec.mean, tower.image_spec.std) == (CLIP_MEAN, CLIP_STD)  # no preprocessor_config.json
    pixels = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad():
        expected = raw(pixel_values=pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
        torch.testing.assert_close(tower(pixels), expected)
