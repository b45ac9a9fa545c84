"""InternViT (VITA-1.5's tower) by config model_type, with a tiny local model in InternViT's remote-code layout.

The tiny model (``tests/model/internvit_tiny/``) has ``model_type`` ``intern_vit_6b`` and an ``auto_map``
to its own ``.py`` files, so it takes the same ``trust_remote_code`` path as InternViT-300M-448px.
A stage-1 step with it runs in ``tests/integration/test_model_families.py`` (it needs the embedded
default's synthetic data).
"""

import json
import os
import shutil

import pytest
import torch
from tiny_models import INTERNVIT_MEAN, INTERNVIT_STD, write_tiny_internvit
from transformers import AutoModel, Qwen2Config, Qwen2ForCausalLM

from vitacore.checkpoint.export import save_full_export
from vitacore.config import ConfigError, parse_args
from vitacore.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from vitacore.data.dataset import Collator, Sample
from vitacore.demo.tokenizer import build_tokenizer, save_tokenizer
from vitacore.model.audio import AudioEncoder, AudioEncoderConfig
from vitacore.model.vision import TOWERS, load_vision_tower, vita_pixel_shuffle
from vitacore.recipes import build_model_from_config

IMAGE, PATCH, HIDDEN = 28, 7, 16  # a 4×4 patch grid -> 4 tokens of width 64 after the shuffle


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """Tiny Qwen2 LLM (+ tokenizer), tiny InternViT, tiny audio encoder, each in its own folder."""
    root = tmp_path_factory.mktemp("internvit")
    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    llm = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=len(tokenizer) + 5, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id))
    llm.save_pretrained(root / "llm")
    save_tokenizer(tokenizer, root / "llm")
    AudioEncoder(AudioEncoderConfig(hidden_size=16, num_layers=1, num_heads=2, ffn_size=32)).save(root / "audio")
    tower = write_tiny_internvit(root / "internvit", image_size=IMAGE, patch_size=PATCH, hidden_size=HIDDEN)
    return {"llm": str(root / "llm"), "tower": tower, "audio": str(root / "audio"), "tokenizer": tokenizer}


def test_pixel_shuffle_order_on_a_hand_computed_grid():
    # A 4×4 grid whose single channel holds the token index (row-major: token = 4 * row + col).
    grid = torch.arange(16.0).view(1, 16, 1)
    expected = torch.tensor([[0.0, 1, 4, 5],      # block (0,0): patches (0,0) (0,1) (1,0) (1,1)
                             [2, 3, 6, 7],        # block (0,1): patches (0,2) (0,3) (1,2) (1,3)
                             [8, 9, 12, 13],      # block (1,0)
                             [10, 11, 14, 15]])   # block (1,1)
    assert torch.equal(vita_pixel_shuffle(grid), expected.view(1, 4, 4))
    # Two channels: each patch contributes its channels contiguously (value = 10 * token + channel).
    two = (10 * torch.arange(16.0).view(16, 1) + torch.arange(2.0)).view(1, 16, 2)
    out = vita_pixel_shuffle(two)
    assert out.shape == (1, 4, 8)
    assert out[0, 0].tolist() == [0, 1, 10, 11, 40, 41, 50, 51]
    assert out[0, 3].tolist() == [100, 101, 110, 111, 140, 141, 150, 151]
    with pytest.raises(ValueError, match="even side"):
        vita_pixel_shuffle(torch.zeros(1, 9, 2))  # 3×3
    with pytest.raises(ValueError, match="square grid"):
        vita_pixel_shuffle(torch.zeros(1, 8, 2))


def test_load_gives_vitas_shapes_and_features(parts):
    tower = load_vision_tower(parts["tower"]).eval()
    assert type(tower.encoder).__module__.startswith("transformers_modules")  # loaded as remote code
    assert (tower.select_layer, tower.drop_cls, tower.pixel_shuffle) == (-1, True, True)
    assert tower.hidden_size == 4 * HIDDEN
    assert tower.num_tokens_per_image == (IMAGE // PATCH) ** 2 // 4
    assert tower.encoder_tokens_per_image == (IMAGE // PATCH) ** 2 + 1
    assert tower.image_spec.image_size == IMAGE
    assert tower.image_spec.mean == INTERNVIT_MEAN and tower.image_spec.std == INTERNVIT_STD
    pixels = torch.randn(2, 3, IMAGE, IMAGE)
    raw = AutoModel.from_pretrained(parts["tower"], trust_remote_code=True).eval()
    with torch.no_grad():
        got = tower(pixels)
        last = raw(pixel_values=pixels, output_hidden_states=True).hidden_states[-1]
    assert got.shape == (2, 4, 4 * HIDDEN)
    patch = last[:, 1:] * 0.5  # CLS dropped, VITA's 0.5 feature scale
    # Output token 0 = patches (0,0), (0,1), (1,0), (1,1); token 1 starts with patch (0,2); token 2 with (2,0).
    torch.testing.assert_close(got[:, 0], torch.cat([patch[:, 0], patch[:, 1], patch[:, 4], patch[:, 5]], dim=-1))
    torch.testing.assert_close(got[:, 1, :HIDDEN], patch[:, 2])
    torch.testing.assert_close(got[:, 2, :HIDDEN], patch[:, 8])


def test_tower_rules_per_family():
    assert (TOWERS["siglip_vision_model"].select_layer, TOWERS["siglip_vision_model"].drop_cls) == (-2, False)
    assert (TOWERS["clip_vision_model"].select_layer, TOWERS["clip_vision_model"].drop_cls) == (-2, True)
    internvit = TOWERS["intern_vit_6b"]
    assert (internvit.select_layer, internvit.drop_cls, internvit.pixel_shuffle, internvit.remote_code) == (
        -1, True, True, True)


def test_unsupported_or_incomplete_towers_are_refused(tmp_path, parts):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text(json.dumps({"model_type": "eva_clip"}))
    with pytest.raises(ValueError, match="'eva_clip' is not a supported tower") as err:
        load_vision_tower(str(tmp_path / "bad"))
    assert "intern_vit_6b" in str(err.value) and "siglip_vision_model" in str(err.value)
    no_code = shutil.copytree(parts["tower"], tmp_path / "no_code")
    config = json.loads((no_code / "config.json").read_text())
    del config["auto_map"]
    (no_code / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="auto_map"):
        load_vision_tower(str(no_code))
    odd = write_tiny_internvit(tmp_path / "odd", image_size=21, patch_size=7)  # 3×3 grid
    with pytest.raises(ValueError, match="even side"):
        load_vision_tower(odd)


def test_use_s2_is_refused_naming_the_flag(tmp_path):
    with pytest.raises(ConfigError, match="--use_s2"):
        parse_args(["--use_s2", "True", "--output_dir", str(tmp_path)])


def _flags(parts, tmp_path, *extra):
    # All three paths given: the embedded default (and its slow first build) is not needed.
    return ["--model_name_or_path", parts["llm"], "--vision_tower", parts["tower"], "--audio_encoder", parts["audio"],
            "--output_dir", str(tmp_path), "--model_max_length", "256", *extra]


def _build(flags, deepspeed_config=None):
    """The model a run with ``flags`` builds."""
    bundle, _ = build_model_from_config(parse_args(flags), deepspeed_config=deepspeed_config)
    return bundle


def _image_batch(vocab_size):
    generator = torch.Generator().manual_seed(3)
    text = torch.randint(3, vocab_size, (10,), generator=generator).tolist()
    ids = text[:2] + [IMAGE_TOKEN_INDEX] + text[2:]
    image = torch.randn(3, IMAGE, IMAGE, generator=generator)
    return Collator(pad_token_id=0)([Sample("img", ids, [IGNORE_INDEX] * 3 + ids[3:], [image], [], [], "lang")])


def test_full_export_reloads_from_its_own_vision_tower_folder(parts, tmp_path):
    model = _build(_flags(parts, tmp_path / "run")).model.eval()
    export = tmp_path / "export"
    save_full_export(model, parts["tokenizer"], str(export), is_main=True, dtype=torch.float32)
    files = sorted(os.listdir(export / "vision_tower"))
    assert files == ["config.json", "configuration_tiny_intern_vit.py", "modeling_tiny_intern_vit.py",
                     "preprocessor_config.json"]
    saved = json.loads((export / "config.json").read_text())
    assert saved["mm_hidden_size"] == 4 * HIDDEN and saved["mm_vision_tower"] == parts["tower"]
    assert "AutoModel" in json.loads((export / "vision_tower" / "config.json").read_text())["auto_map"]

    # The recorded tower path is gone: the export's vision_tower/ folder (with its code) must suffice.
    moved = shutil.move(parts["tower"], str(tmp_path / "moved_tower"))
    try:
        loaded = _build(["--model_name_or_path", str(export), "--output_dir", str(tmp_path / "r")]).model.eval()
    finally:
        shutil.move(moved, parts["tower"])
    assert loaded.vision_tower.pixel_shuffle and loaded.vision_tower.hidden_size == 4 * HIDDEN
    original = model.state_dict()
    assert set(loaded.state_dict()) == set(original)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in original.items())
    batch = _image_batch(model.llm.config.vocab_size)
    with torch.no_grad():
        assert torch.equal(loaded(**batch)["logits"], model(**batch)["logits"])


def test_zero3_build_partitions_the_remote_tower_and_exports_the_same_tensors(parts, tmp_path, dist):
    import deepspeed
    from safetensors.torch import load_file

    zero3 = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "steps_per_print": 10**9,
             "zero_allow_untested_optimizer": True,
             "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
    model = _build(_flags(parts, tmp_path / "run")).model.eval()
    save_full_export(model, parts["tokenizer"], str(tmp_path / "plain"), is_main=True, dtype=torch.float32)
    built = _build(["--model_name_or_path", str(tmp_path / "plain"), "--output_dir", str(tmp_path / "r")],
                   deepspeed_config=zero3).model
    assert all(hasattr(p, "ds_id") for p in built.vision_tower.parameters())  # zero.Init through AutoModel
    engine, *_ = deepspeed.initialize(model=built, optimizer=torch.optim.AdamW(built.mm_projector.parameters()),
                                      config=zero3, dist_init_required=False)
    save_full_export(engine, parts["tokenizer"], str(tmp_path / "zero3"), is_main=True, dtype=torch.float32)
    plain = load_file(str(tmp_path / "plain" / "model.safetensors"))
    again = load_file(str(tmp_path / "zero3" / "model.safetensors"))
    assert set(plain) == set(again) and all(torch.equal(plain[k], again[k]) for k in plain)
    folders = [sorted(os.listdir(tmp_path / name / "vision_tower")) for name in ("plain", "zero3")]
    assert folders[0] == folders[1] and "modeling_tiny_intern_vit.py" in folders[0]
