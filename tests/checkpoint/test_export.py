"""The full export (VITA layout) and loading it back: build_model, from_pretrained, ZeRO-3."""

import copy
import json
import logging
import os
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tiny_models import TINY, build_tiny_vita
from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

from vitacore.checkpoint.export import load_full_export, save_full_export
from vitacore.checkpoint.export import writer as export_writer
from vitacore.checkpoint.vita_layout import to_vita_name
from vitacore.config import parse_args
from vitacore.constants import AUDIO_TOKEN_INDEX, IGNORE_INDEX, IMAGE_TOKEN_INDEX
from vitacore.data.audio import audio_token_length
from vitacore.data.dataset import Collator, Sample
from vitacore.demo.tokenizer import build_tokenizer
from vitacore.model import module_for_engine
from vitacore.recipes import build_model_from_config, plan_model

MM_PREFIXES = ("model.mm_projector.", "model.vision_tower.vision_tower.", "model.audio_encoder.encoder.",
               "model.audio_encoder.adpter.", "model.audio_encoder.prompt_embeddings.", "predictor_head.")


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def tiny(seed=0, tied=False, **kwargs):
    """The shared tiny VitaModel; ``tied`` swaps in an LLM whose lm_head is its embedding matrix."""
    model = build_tiny_vita(seed=seed, **kwargs)
    if tied:
        torch.manual_seed(seed + 100)
        model.llm = Qwen2ForCausalLM(Qwen2Config(
            vocab_size=TINY["vocab_size"], hidden_size=TINY["llm_hidden"], intermediate_size=64,
            num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True))
    return model.eval()


def batch():
    """Row 0: text, an image and an audio clip; row 1: text only."""
    generator = torch.Generator().manual_seed(7)
    text = torch.randint(3, TINY["vocab_size"], (12,), generator=generator).tolist()
    ids0 = text[:2] + [IMAGE_TOKEN_INDEX] + text[2:4] + [AUDIO_TOKEN_INDEX] + text[4:]
    samples = [
        Sample("mm", ids0, [IGNORE_INDEX] * 6 + ids0[6:],
               [torch.randn(3, TINY["image_size"], TINY["image_size"], generator=generator)],
               [torch.randn(40, TINY["mel"], generator=generator)], [audio_token_length(40)], "lang"),
        Sample("text", text[:9], [IGNORE_INDEX] * 3 + text[3:9], [], [], [], "lang"),
    ]
    return Collator(pad_token_id=0)(samples)


def logits(model, data=None):
    model.eval()
    model.loss_chunk_size = 0  # the full-logits path, which returns the logits
    with torch.no_grad():
        return model(**(data or batch()))["logits"]


def reload(path, tmp_path, *flags):
    config = parse_args(["--model_name_or_path", str(path), "--output_dir", str(tmp_path / "run"), *flags])
    return build_model_from_config(config)[0]


def keys_of(path):
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as fh:
            return set(json.load(fh)["weight_map"])
    with safe_open(os.path.join(path, "model.safetensors"), "pt") as reader:
        return set(reader.keys())


def all_tensors(path):
    tensors = {}
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            tensors.update(load_file(os.path.join(path, name)))
    return tensors


def test_fp32_export_reloads_to_identical_logits_and_parts(tmp_path, tokenizer):
    model = tiny(tied=True, audio_prompt_num=3, state_head=True)
    written = save_full_export(model, tokenizer, str(tmp_path / "export"), is_main=True, dtype=torch.float32)
    export = tmp_path / "export"
    assert set(written) >= {"config.json", "model.safetensors", "generation_config.json", "vision_tower",
                            "audio_encoder", "tokenizer"}
    assert sorted(os.listdir(export / "vision_tower")) == ["config.json", "preprocessor_config.json"]
    assert os.listdir(export / "audio_encoder") == ["vitacore_audio_config.json"]
    config = json.loads((export / "config.json").read_text())
    assert config["model_type"] == "qwen2" and config["dtype"] == "float32" and config["torch_dtype"] == "float32"
    assert config["mm_projector_type"] == "mlp2x_gelu" and config["mm_hidden_size"] == TINY["vision_hidden"]
    assert config["use_mm_proj"] is True and config["audio_prompt_num"] == 3 and config["audio_prompt_finetune"]
    assert config["tokenizer_padding_side"] == "right" and config["tokenizer_model_max_length"] == 128
    assert config["vitacore"]["format"] == "vitacore-full-export" and config["vitacore"]["version"] == 1
    assert config["vitacore"]["vision_tower_config"] == "vision_tower"

    bundle = reload(export, tmp_path)
    loaded = bundle.model
    assert loaded.state_head is not None and loaded.audio_prompt.num_embeddings == 3
    assert loaded.llm.get_output_embeddings().weight is loaded.llm.get_input_embeddings().weight  # re-tied
    assert loaded.mm_config["mm_projector_type"] == "mlp2x_gelu" and "mm_vision_tower" not in loaded.llm.config.__dict__
    original = model.state_dict()
    assert set(loaded.state_dict()) == set(original)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in original.items())
    assert torch.equal(logits(loaded), logits(model))


def test_bf16_export_equals_the_model_cast_to_bf16(tmp_path, tokenizer):
    model = tiny(seed=1)
    save_full_export(model, tokenizer, str(tmp_path / "export"), is_main=True)  # bf16 is the default
    tensors = all_tensors(tmp_path / "export")
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    assert json.loads((tmp_path / "export" / "config.json").read_text())["dtype"] == "bfloat16"
    loaded = reload(tmp_path / "export", tmp_path, "--bf16", "True").model
    assert next(loaded.parameters()).dtype == torch.bfloat16
    # Cast as from_pretrained(dtype=bf16) casts: parameters only; the rotary inv_freq buffers
    # (non-persistent, never in a file) stay float32, which `.to(torch.bfloat16)` would round.
    cast = copy.deepcopy(model)
    for param in cast.parameters():
        param.data = param.data.to(torch.bfloat16)
    expected = logits(cast)
    assert torch.equal(logits(loaded), expected)


@pytest.mark.parametrize("tied", [False, True])
def test_from_pretrained_loads_the_llm_part(tmp_path, tokenizer, tied):
    model = tiny(seed=2, tied=tied)
    save_full_export(model, tokenizer, str(tmp_path / "export"), is_main=True, dtype=torch.float32)
    llm = AutoModelForCausalLM.from_pretrained(str(tmp_path / "export")).eval()
    ids = torch.randint(0, TINY["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(llm(ids).logits, model.llm(ids).logits)


@pytest.mark.parametrize("tied", [False, True])
def test_key_names_are_vitas(tmp_path, tokenizer, tied):
    model = tiny(seed=3, tied=tied)
    save_full_export(model, tokenizer, str(tmp_path / "export"), is_main=True)
    keys = keys_of(tmp_path / "export")
    assert {"model.mm_projector.0.weight", "model.mm_projector.2.bias", "model.audio_encoder.adpter.conv1d2.weight",
            "model.audio_encoder.adpter.bn2.weight", "model.audio_encoder.adpter.project.weight",
            "model.embed_tokens.weight", "model.norm.weight"} <= keys
    assert any(k.startswith("model.vision_tower.vision_tower.embeddings.") for k in keys)
    assert any(k.startswith("model.audio_encoder.encoder.") for k in keys)
    assert ("lm_head.weight" in keys) is not tied  # a tied head is re-tied on load, as HF saves it
    for key in keys:
        assert key.startswith(MM_PREFIXES) or key.startswith(("model.layers.", "model.embed_tokens.", "model.norm.",
                                                              "lm_head.")), key
    expected = {to_vita_name(n) for n in model.state_dict()} - ({"lm_head.weight"} if tied else set())
    assert keys == expected


def test_small_shards_get_an_index_and_reload(tmp_path, tokenizer):
    model = tiny(seed=4)
    written = save_full_export(model, tokenizer, str(tmp_path / "export"), is_main=True, dtype=torch.float32,
                               max_shard_size="30KB")
    shards = sorted(n for n in os.listdir(tmp_path / "export") if n.endswith(".safetensors"))
    assert len(shards) > 2 and "model.safetensors" not in shards
    assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors" and set(shards) <= set(written)
    index = json.loads((tmp_path / "export" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    tensors = all_tensors(tmp_path / "export")
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    for name in shards:  # no shard over the limit unless it holds a single larger tensor
        on_disk = load_file(os.path.join(tmp_path / "export", name))
        assert len(on_disk) == 1 or sum(t.numel() * 4 for t in on_disk.values()) <= 30_000
    assert torch.equal(logits(reload(tmp_path / "export", tmp_path).model), logits(model))


def test_encoder_paths_override_or_fail_clearly(tmp_path, tokenizer):
    model = tiny(seed=5)
    export = tmp_path / "export"
    save_full_export(model, tokenizer, str(export), is_main=True, dtype=torch.float32)
    shutil.move(export / "vision_tower", tmp_path / "tower")
    with pytest.raises(FileNotFoundError, match="mm_vision_tower.*--vision_tower"):
        reload(export, tmp_path)
    expected = logits(model)
    assert torch.equal(logits(reload(export, tmp_path, "--vision_tower", str(tmp_path / "tower")).model), expected)

    config = json.loads((export / "config.json").read_text())
    config["mm_vision_tower"] = str(tmp_path / "tower")  # the recorded path exists here: used
    (export / "config.json").write_text(json.dumps(config))
    assert torch.equal(logits(reload(export, tmp_path).model), expected)

    shutil.rmtree(export / "audio_encoder")
    with pytest.raises(FileNotFoundError, match="mm_audio_encoder.*--audio_encoder"):
        reload(export, tmp_path)


def test_interrupted_export_leaves_the_earlier_one_and_other_files_intact(tmp_path, tokenizer, monkeypatch):
    out = tmp_path / "output"
    (out / "checkpoint-5").mkdir(parents=True)
    (out / "metrics.jsonl").write_text("{}\n")
    first, second = tiny(seed=6), tiny(seed=7)
    save_full_export(first, tokenizer, str(out), is_main=True, dtype=torch.float32, max_shard_size="30KB")
    first_files = set(os.listdir(out))

    def killed(staging, directory):
        raise KeyboardInterrupt("killed before the rename")

    monkeypatch.setattr(export_writer, "publish_into", killed)
    with pytest.raises(KeyboardInterrupt):
        save_full_export(second, tokenizer, str(out), is_main=True, dtype=torch.float32)
    monkeypatch.undo()
    assert set(os.listdir(out)) == first_files
    assert [p for p in os.listdir(tmp_path) if p != "output"] == []  # the staging folder is gone
    assert torch.equal(logits(reload(out, tmp_path).model), logits(first))

    save_full_export(second, tokenizer, str(out), is_main=True, dtype=torch.float32)  # one shard now
    assert not any(n.startswith("model-0") for n in os.listdir(out)) and (out / "model.safetensors").exists()
    assert not (out / "model.safetensors.index.json").exists()
    assert (out / "metrics.jsonl").exists() and (out / "checkpoint-5").is_dir()
    assert torch.equal(logits(reload(out, tmp_path).model), logits(second))


def test_refuses_to_overwrite_foreign_files_and_unmerged_lora(tmp_path, tokenizer):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="not from an earlier vitacore export"):
        save_full_export(tiny(), tokenizer, str(foreign), is_main=True)
    (foreign / "config.json").unlink()
    (foreign / "tokenizer.json").write_text("{}")
    with pytest.raises(ValueError, match=r"tokenizer\.json"):
        save_full_export(tiny(), tokenizer, str(foreign), is_main=True)
    assert (foreign / "tokenizer.json").read_text() == "{}" and not (foreign / "config.json").exists()

    peft = pytest.importorskip("peft")
    model = tiny()
    model.llm = peft.get_peft_model(model.llm, peft.LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="merge-lora"):
        save_full_export(model, tokenizer, str(tmp_path / "lora"), is_main=True)
    assert not (tmp_path / "lora").exists()


def test_stray_or_missing_tensors_are_errors_naming_file_and_keys(tmp_path, tokenizer):
    export = tmp_path / "export"
    save_full_export(tiny(seed=8), tokenizer, str(export), is_main=True, dtype=torch.float32)
    weights = load_file(export / "model.safetensors")
    save_file({**weights, "model.mm_projector.9.weight": torch.zeros(2)}, export / "model.safetensors",
              metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"fit no part.*model\.mm_projector\.9\.weight \(model\.safetensors\)"):
        reload(export, tmp_path)
    del weights["model.audio_encoder.adpter.project.bias"]
    save_file(weights, export / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing from the weight files \(model\.safetensors\).*project\.bias"):
        reload(export, tmp_path)


def test_a_missing_llm_tensor_is_reported_not_fatal(tmp_path, tokenizer, caplog):
    export = tmp_path / "export"
    save_full_export(tiny(seed=8), tokenizer, str(export), is_main=True, dtype=torch.float32)
    weights = load_file(export / "model.safetensors")
    del weights["model.norm.weight"]
    save_file(weights, export / "model.safetensors", metadata={"format": "pt"})
    with caplog.at_level(logging.INFO, logger="vitacore"):
        build_model_from_config(parse_args(["--model_name_or_path", str(export), "--output_dir", str(tmp_path)]))
    notes = [record.getMessage() for record in caplog.records]
    assert any("WARNING" in n and "model.norm.weight" in n for n in notes), notes


def test_a_vita_style_checkpoint_folder_loads(tmp_path, tokenizer):
    """VITA's layout without vitacore's extras: model_type vita-Qwen2, encoders found by recorded paths."""
    model = tiny(seed=12)
    export = tmp_path / "vita"
    save_full_export(model, tokenizer, str(export), is_main=True, dtype=torch.float32)
    shutil.move(export / "vision_tower", tmp_path / "tower")
    shutil.move(export / "audio_encoder", tmp_path / "audio")
    config = json.loads((export / "config.json").read_text())
    del config["vitacore"]
    config.update(model_type="vita-Qwen2", architectures=["VITAQwen2ForCausalLM"],
                  mm_vision_tower=str(tmp_path / "tower"), mm_audio_encoder=str(tmp_path / "audio"))
    (export / "config.json").write_text(json.dumps(config))
    run = parse_args(["--model_name_or_path", str(export), "--output_dir", str(tmp_path / "run")])
    assert plan_model(run, with_data=False).hidden_size == TINY["llm_hidden"]
    loaded = build_model_from_config(run)[0].model
    assert torch.equal(logits(loaded), logits(model))
    assert loaded.mm_config["mm_vision_tower"] == str(tmp_path / "tower")


def test_load_full_export_and_adapter_override(tmp_path, tokenizer):
    model = tiny(seed=9)
    save_full_export(model, tokenizer, str(tmp_path / "export"), is_main=True, dtype=torch.float32)
    bundle = load_full_export(str(tmp_path / "export"))
    assert torch.equal(logits(bundle.model), logits(model))
    assert bundle.tokenizer.get_vocab() == tokenizer.get_vocab()

    other = tiny(seed=10)
    torch.save({f"model.mm_projector.{k}": v for k, v in other.mm_projector.state_dict().items()},
               tmp_path / "mm_projector.bin")
    loaded = reload(tmp_path / "export", tmp_path, "--pretrain_mm_mlp_adapter", str(tmp_path / "mm_projector.bin"))
    assert torch.equal(loaded.model.mm_projector[0].weight, other.mm_projector[0].weight)


ZERO3 = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "steps_per_print": 10**9,
         "zero_allow_untested_optimizer": True,
         "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}


@pytest.mark.parametrize("frozen_parts", ["partitioned", "whole"])
def test_zero3_partitioned_export_equals_the_unpartitioned_one(tmp_path, tokenizer, dist, frozen_parts):
    """With --zero3_frozen_parts whole, the frozen tower (built partitioned) is made whole again and held out of
    the engine: the export (of the engine, as a run writes it) still holds it, every tensor equal."""
    import deepspeed

    model = tiny(seed=11, tied=True)
    save_full_export(model, tokenizer, str(tmp_path / "plain"), is_main=True, dtype=torch.float32,
                     max_shard_size="40KB")
    config = parse_args(["--model_name_or_path", str(tmp_path / "plain"), "--output_dir", str(tmp_path / "run")])
    built = build_model_from_config(config, deepspeed_config=ZERO3)[0].model
    # LLM and tower arrive partitioned (zero.Init); initialize partitions the rest.
    assert all(hasattr(p, "ds_id") for p in built.llm.parameters())
    assert all(hasattr(p, "ds_id") for p in built.vision_tower.parameters())
    for unit, part in built.unit_modules().items():  # stage 1: only the projector trains
        part.requires_grad_(unit == "mm_projector")
    trainable = list(built.mm_projector.parameters())
    module = module_for_engine(built, ZERO3, frozen_parts)
    engine, *_ = deepspeed.initialize(model=module, optimizer=torch.optim.AdamW(trainable, lr=1e-3), config=ZERO3,
                                      dist_init_required=False)
    assert all(hasattr(p, "ds_id") and p.numel() == 0 for p in engine.module.parameters())
    held_out = getattr(engine.module, "held_out", ())
    assert set(held_out) == (set() if frozen_parts == "partitioned" else set(built.unit_modules()) - {"llm",
                                                                                                   "mm_projector"})
    if frozen_parts == "whole":
        assert "vision_tower" in held_out
        assert not any(hasattr(p, "ds_id") for p in built.vision_tower.parameters())
        assert sum(p.numel() for p in built.vision_tower.parameters()) == sum(
            p.numel() for p in model.vision_tower.parameters())

    save_full_export(engine, tokenizer, str(tmp_path / "zero3"), is_main=True, dtype=torch.float32,
                     max_shard_size="40KB")
    plain, zero3 = all_tensors(tmp_path / "plain"), all_tensors(tmp_path / "zero3")
    assert set(plain) == set(zero3) and all(torch.equal(plain[k], zero3[k]) for k in plain)
    assert sorted(os.listdir(tmp_path / "plain")) == sorted(os.listdir(tmp_path / "zero3"))
    assert torch.equal(logits(reload(tmp_path / "zero3", tmp_path).model), logits(model))
