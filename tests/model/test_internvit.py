"""InternViT (VITA-1.5's tower) by config model_type, with tiny local models in InternViT's remote-code layout.

Two tiny towers: a look-alike (``tests/model/internvit_tiny/``: ``model_type`` ``intern_vit_6b`` and an
``auto_map`` to its own ``.py`` files, which call ``post_init`` and import no timm), and one laid out as
InternViT-300M-448px is released (``tests/model/internvit_real/``: the release's file and class names,
its module-level ``timm`` import and its ``__init__`` without ``post_init``), which plain transformers
cannot load here. Stage runs with each are in ``tests/integration/`` (they need the embedded default's
synthetic data).
"""

import importlib.util
import json
import os
import shutil
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import INTERNVIT_MEAN, INTERNVIT_STD, internvit_key_shapes, write_real_internvit, write_tiny_internvit
from transformers import AutoModel, Qwen2Config, Qwen2ForCausalLM

from vitacore.checkpoint.export import save_full_export
from vitacore.config import ConfigError, parse_args
from vitacore.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from vitacore.data.dataset import Collator, Sample
from vitacore.demo.tokenizer import build_tokenizer, save_tokenizer
from vitacore.model.audio import AudioEncoder, AudioEncoderConfig
from vitacore.model.remote_code import DropPath, timm_standin
from vitacore.model.vision import TOWERS, build_vision_tower, load_vision_tower, vita_pixel_shuffle
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
    tower = load_vision_tower(parts["tower"], trust_remote_code=True).eval()
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
        load_vision_tower(str(tmp_path / "bad"), trust_remote_code=True)
    assert "intern_vit_6b" in str(err.value) and "siglip_vision_model" in str(err.value)
    no_code = shutil.copytree(parts["tower"], tmp_path / "no_code")
    config = json.loads((no_code / "config.json").read_text())
    del config["auto_map"]
    (no_code / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="auto_map"):
        load_vision_tower(str(no_code), trust_remote_code=True)
    odd = write_tiny_internvit(tmp_path / "odd", image_size=21, patch_size=7)  # 3×3 grid
    with pytest.raises(ValueError, match="even side"):
        load_vision_tower(odd, trust_remote_code=True)


def test_use_s2_is_refused_naming_the_flag(tmp_path):
    with pytest.raises(ConfigError, match="--use_s2"):
        parse_args(["--use_s2", "True", "--output_dir", str(tmp_path)])


def _flags(parts, tmp_path, *extra):
    # All three paths given: the embedded default (and its slow first build) is not needed.
    return ["--model_name_or_path", parts["llm"], "--vision_tower", parts["tower"], "--audio_encoder", parts["audio"],
            "--output_dir", str(tmp_path), "--model_max_length", "256", *extra]


def _build(flags, deepspeed_config=None):
    """The model a run with ``flags`` builds (the towers here are remote code: consent given)."""
    bundle, _ = build_model_from_config(parse_args([*flags, "--trust_remote_code", "True"]),
                                        deepspeed_config=deepspeed_config)
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
    loaded.loss_chunk_size = model.loss_chunk_size = 0  # the full-logits path, which returns the logits
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


# --- The tower as released: module-level timm import, no post_init() (tests/model/internvit_real) ---

ZERO3 = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "steps_per_print": 10**9,
         "zero_allow_untested_optimizer": True,
         "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}


@pytest.fixture(scope="module")
def real_tower(tmp_path_factory):
    return write_real_internvit(tmp_path_factory.mktemp("internvit_real") / "InternViT-300M-448px",
                                image_size=IMAGE, patch_size=PATCH, hidden_size=HIDDEN)


def _file_weights(folder):
    return {k: v.float() for k, v in load_file(os.path.join(folder, "model.safetensors")).items()}


def test_released_layout_fails_in_plain_transformers_and_loads_in_vitacore(real_tower):
    assert importlib.util.find_spec("timm") is None  # this environment has no timm, and must keep it that way
    with pytest.raises(ImportError, match="timm"):
        AutoModel.from_pretrained(real_tower, trust_remote_code=True)
    with timm_standin(), pytest.raises(AttributeError, match="all_tied_weights_keys"):  # the missing post_init()
        AutoModel.from_pretrained(real_tower, trust_remote_code=True)
    assert "timm" not in sys.modules  # the stand-in leaves with its context

    tower = load_vision_tower(real_tower, trust_remote_code=True)
    encoder = tower.encoder
    assert type(encoder).__name__ == "InternVisionModel" and type(encoder).__module__.startswith("transformers_modules")
    assert not encoder.training and hasattr(encoder, "all_tied_weights_keys")  # post-init state completed
    assert "timm" not in sys.modules and importlib.util.find_spec("timm") is None
    # drop_path_rate 0.1 over 2 layers: layer 0 gets rate 0 (Identity), layer 1 gets vitacore's DropPath(0.1).
    assert isinstance(encoder.encoder.layers[0].drop_path1, torch.nn.Identity)
    last_drop = encoder.encoder.layers[1].drop_path2
    assert isinstance(last_drop, DropPath) and last_drop.drop_prob == pytest.approx(0.1)
    state = encoder.state_dict()
    stored = _file_weights(real_tower)  # bfloat16 on disk, float32 in the model: exact
    assert set(state) == set(stored) == set(internvit_key_shapes(encoder.config.to_dict()))
    assert all(state[k].dtype == torch.float32 and torch.equal(state[k], stored[k]) for k in stored)
    assert (tower.hidden_size, tower.num_tokens_per_image, tower.encoder_tokens_per_image) == (4 * HIDDEN, 4, 17)
    assert tower.image_spec.mean == INTERNVIT_MEAN and tower.image_spec.std == INTERNVIT_STD
    pixels = torch.randn(2, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        features = tower(pixels)
        last = encoder(pixel_values=pixels, output_hidden_states=True).hidden_states[-1]
    assert torch.equal(features, vita_pixel_shuffle(last[:, 1:] * 0.5)) and features.abs().sum() > 0


def test_the_6b_variant_with_rms_norms_and_qk_normalization_loads(tmp_path):
    folder = write_real_internvit(tmp_path / "6b_style", norm_type="rms_norm", qk_normalization=True, seed=4)
    tower = load_vision_tower(folder, trust_remote_code=True)
    layer = tower.encoder.encoder.layers[0]
    assert type(layer.norm1).__name__ == "InternRMSNorm" and hasattr(layer.attn, "q_norm")
    state = tower.encoder.state_dict()
    assert all(torch.equal(state[k], v) for k, v in _file_weights(folder).items())


def _rewrite_weights(folder, change):
    path = os.path.join(folder, "model.safetensors")
    weights = load_file(path)
    change(weights)
    save_file(weights, path, metadata={"format": "pt"})


def test_weights_that_do_not_fit_are_refused_naming_the_folder_and_key(real_tower, tmp_path):
    cases = {
        "missing": (lambda w: w.pop("encoder.layers.1.mlp.fc2.bias"), "no 'encoder.layers.1.mlp.fc2.bias'"),
        "unexpected": (lambda w: w.update({"encoder.layers.2.ls1": torch.ones(HIDDEN)}),
                       "hold 'encoder.layers.2.ls1'"),
        "shape": (lambda w: w.update({"encoder.layers.0.ls2": torch.ones(HIDDEN + 1)}),
                  r"'encoder.layers.0.ls2' has shape \(17,\) in the weights but \(16,\)"),
    }
    for name, (change, message) in cases.items():
        folder = shutil.copytree(real_tower, tmp_path / name)
        _rewrite_weights(folder, change)
        with pytest.raises(ValueError, match=message) as err:
            load_vision_tower(str(folder), trust_remote_code=True)
        assert f"--vision_tower {str(folder)!r}" in str(err.value)
    empty = shutil.copytree(real_tower, tmp_path / "no_weights")
    os.remove(empty / "model.safetensors")
    with pytest.raises(ValueError, match="no weights") as err:
        load_vision_tower(str(empty), trust_remote_code=True)
    assert f"--vision_tower {str(empty)!r}" in str(err.value)


def test_broken_folders_are_value_errors_naming_the_folder(real_tower, tmp_path):
    syntax = shutil.copytree(real_tower, tmp_path / "syntax")
    with open(syntax / "modeling_intern_vit.py", "a") as fh:
        fh.write("\ndef broken(:\n")
    with pytest.raises(ValueError, match="SyntaxError") as err:
        load_vision_tower(str(syntax), trust_remote_code=True)
    assert f"--vision_tower {str(syntax)!r}: the tower does not load" in str(err.value)
    assert isinstance(err.value.__cause__.__cause__, SyntaxError)  # ValueError <- RemoteCodeError <- SyntaxError
    wrong_class = shutil.copytree(real_tower, tmp_path / "wrong_class")
    config = json.loads((wrong_class / "config.json").read_text())
    config["auto_map"]["AutoModel"] = "modeling_intern_vit.InternViTModel"
    (wrong_class / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="importing modeling_intern_vit.InternViTModel raised AttributeError") as err:
        build_vision_tower(str(wrong_class), trust_remote_code=True)
    assert str(wrong_class) in str(err.value)
    heads = shutil.copytree(real_tower, tmp_path / "heads")  # the folder's own code refuses its config
    config = json.loads((heads / "config.json").read_text())
    config["num_attention_heads"] = 3
    (heads / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"InternVisionModel\(config\) raised ValueError: hidden_size 16") as err:
        load_vision_tower(str(heads), trust_remote_code=True)
    assert f"--vision_tower {str(heads)!r}: the tower does not load" in str(err.value)
    garbled = shutil.copytree(real_tower, tmp_path / "garbled")
    (garbled / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        load_vision_tower(str(garbled), trust_remote_code=True)
    with pytest.raises(ValueError, match="trust_remote_code"):
        load_vision_tower(real_tower, trust_remote_code=False)


def test_zero3_load_partitions_the_released_tower_and_fills_it_from_the_file(parts, real_tower, tmp_path, dist):
    from vitacore.checkpoint import gathered_state

    model = _build([*_flags(parts, tmp_path), "--vision_tower", real_tower], deepspeed_config=ZERO3).model
    params = list(model.vision_tower.parameters())
    assert params and all(hasattr(p, "ds_id") and p.numel() == 0 for p in params)  # partitioned (one rank: all here)
    state = gathered_state(model.vision_tower.encoder)
    stored = _file_weights(real_tower)
    assert set(state) == set(stored) and all(torch.equal(state[k], stored[k]) for k in stored)


def test_full_export_of_the_released_tower_reloads_with_equal_logits(parts, real_tower, tmp_path):
    model = _build([*_flags(parts, tmp_path / "run"), "--vision_tower", real_tower]).model.eval()
    export = tmp_path / "export"
    save_full_export(model, parts["tokenizer"], str(export), is_main=True, dtype=torch.float32)
    assert sorted(os.listdir(export / "vision_tower")) == ["config.json", "configuration_intern_vit.py",
                                                          "modeling_intern_vit.py", "preprocessor_config.json"]
    code = (export / "vision_tower" / "modeling_intern_vit.py").read_text()
    assert "from timm.models.layers import DropPath" in code  # copied as released, never rewritten
    moved = shutil.move(real_tower, str(tmp_path / "moved"))
    try:  # the export's own vision_tower/ folder must suffice
        loaded = _build(["--model_name_or_path", str(export), "--output_dir", str(tmp_path / "r")]).model.eval()
    finally:
        shutil.move(moved, real_tower)
    assert type(loaded.vision_tower.encoder).__name__ == "InternVisionModel" and "timm" not in sys.modules
    original = model.state_dict()
    assert set(loaded.state_dict()) == set(original)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in original.items())
    batch = _image_batch(model.llm.config.vocab_size)
    loaded.loss_chunk_size = model.loss_chunk_size = 0  # the full-logits path, which returns the logits
    with torch.no_grad():
        assert torch.equal(loaded(**batch)["logits"], model(**batch)["logits"])
