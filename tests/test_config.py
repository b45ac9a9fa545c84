"""Tests for vitacore.config: VITA flag compatibility, YAML configs and validation."""

import dataclasses
import shlex

import pytest

from vitacore.config import (
    ConfigError,
    DataArguments,
    ModelArguments,
    RunConfig,
    TrainingArguments,
    load_yaml_config,
    parse_args,
    validate,
)

# VITA's script/train/pretrain_mlp_qwen.sh, launcher and path-valued flags removed.
VITA_PRETRAIN_MLP = """
--model_type qwen2p5_instruct --version qwen2p5_instruct --dataset_use Pretrain_video0
--mm_projector_type mlp2x_gelu --tune_mm_mlp_adapter True --freeze_audio_encoder True
--freeze_audio_encoder_adapter True --image_aspect_ratio square --group_by_modality_length False
--bf16 True --num_train_epochs 1 --per_device_train_batch_size 8 --per_device_eval_batch_size 4
--gradient_accumulation_steps 2 --evaluation_strategy "no" --save_strategy "steps"
--save_steps 500 --save_total_limit 1 --learning_rate 5e-4 --weight_decay 0. --warmup_ratio 0.03
--lr_scheduler_type "cosine" --logging_steps 1 --tf32 True --model_max_length 6200
--gradient_checkpointing True --dataloader_num_workers 0 --lazy_preprocess True --report_to none
"""
PATH_FLAGS = "--model_name_or_path /x --vision_tower /y --audio_encoder /z --output_dir /o " \
             "--deepspeed zero3.json"


def test_vita_pretrain_script_flags_land_in_the_right_fields():
    cfg = parse_args(shlex.split(VITA_PRETRAIN_MLP))
    m, d, t = cfg.model, cfg.data, cfg.training
    assert (m.model_type, m.version, m.mm_projector_type) == (
        "qwen2p5_instruct", "qwen2p5_instruct", "mlp2x_gelu")
    assert m.tune_mm_mlp_adapter is True
    assert m.freeze_audio_encoder is True and m.freeze_audio_encoder_adapter is True
    assert (d.dataset_use, d.image_aspect_ratio, d.lazy_preprocess) == ("Pretrain_video0", "square", True)
    assert t.group_by_modality_length is False and t.bf16 is True and t.fp16 is False
    assert t.num_train_epochs == 1.0 and isinstance(t.num_train_epochs, float)
    assert (t.per_device_train_batch_size, t.per_device_eval_batch_size) == (8, 4)
    assert t.gradient_accumulation_steps == 2
    assert (t.eval_strategy, t.save_strategy, t.save_steps, t.save_total_limit) == ("no", "steps", 500, 1)
    assert t.learning_rate == pytest.approx(5e-4)
    assert t.weight_decay == 0.0 and t.warmup_ratio == pytest.approx(0.03)
    assert (t.lr_scheduler_type, t.logging_steps, t.tf32) == ("cosine", 1, True)
    assert (t.model_max_length, t.gradient_checkpointing, t.dataloader_num_workers) == (6200, True, 0)
    assert t.report_to == "none"
    # Flags not given keep their defaults and are not explicit.
    assert t.max_steps == -1 and not cfg.is_explicit("max_steps")
    assert cfg.is_explicit("eval_strategy") and cfg.source_of("bf16") == "flag"


def test_vita_pretrain_script_with_path_flags():
    cfg = parse_args(shlex.split(VITA_PRETRAIN_MLP + PATH_FLAGS))
    assert cfg.model.model_name_or_path == "/x"
    assert (cfg.model.vision_tower, cfg.model.audio_encoder) == ("/y", "/z")
    assert (cfg.training.output_dir, cfg.training.deepspeed) == ("/o", "zero3.json")


def test_defaults_are_valid_and_not_explicit():
    cfg = parse_args([])
    assert cfg == RunConfig()
    assert cfg.field_sources == {}
    assert cfg.data.dataset_use is None and cfg.stage is None  # resolved later: 1 for the demo, none with an LLM


# ----------------------------------------------------------------------------- flag syntax


def test_equals_form_and_dashes():
    cfg = parse_args(["--learning_rate=3e-3", "--per-device-train-batch-size", "2",
                      "--output-dir=/tmp/o", "--local_rank=3"])
    assert cfg.training.learning_rate == pytest.approx(3e-3)
    assert cfg.training.per_device_train_batch_size == 2
    assert cfg.training.output_dir == "/tmp/o"
    assert cfg.training.local_rank == 3
    assert parse_args(["--local-rank=1"]).training.local_rank == 1
    assert parse_args(["--local_rank", "0"]).training.local_rank == 0


@pytest.mark.parametrize("word,expected", [
    ("True", True), ("true", True), ("1", True), ("yes", True),
    ("False", False), ("false", False), ("0", False), ("no", False),
])
def test_bool_spellings(word, expected):
    assert parse_args(["--gradient_checkpointing", word]).training.gradient_checkpointing is expected
    assert parse_args([f"--use_thumbnail={word}"]).data.use_thumbnail is expected


def test_bare_bool_means_true():
    cfg = parse_args(["--bf16", "--gradient_checkpointing"])
    assert cfg.training.bf16 is True and cfg.training.gradient_checkpointing is True
    assert parse_args(["--dry_run"]).dry_run is True


def test_bool_rejects_other_words():
    with pytest.raises(ConfigError, match="--bf16"):
        parse_args(["--bf16", "maybe"])


def test_optional_none_and_literal_strings():
    cfg = parse_args(["--image_aspect_ratio", "None", "--tf32", "none", "--save_total_limit", "None",
                      "--mm_projector_lr", "none", "--report_to", "none", "--save_strategy", "no",
                      "--resume_from_checkpoint", "False"])
    assert cfg.data.image_aspect_ratio is None and cfg.training.tf32 is None
    assert cfg.training.save_total_limit is None and cfg.training.mm_projector_lr is None
    assert cfg.training.report_to == "none" and cfg.training.save_strategy == "no"
    assert cfg.training.resume_from_checkpoint == "False"
    assert parse_args(["--resume_from_checkpoint", "None"]).training.resume_from_checkpoint == "None"


def test_number_conversion():
    cfg = parse_args(["--save_steps", "500", "--weight_decay", "0.", "--learning_rate", "5e-4",
                      "--num_train_epochs", "3", "--max_steps", "-1"])
    t = cfg.training
    assert t.save_steps == 500 and t.weight_decay == 0.0 and t.learning_rate == pytest.approx(5e-4)
    assert t.num_train_epochs == 3.0 and isinstance(t.num_train_epochs, float)
    assert t.max_steps == -1


def test_argv_none_reads_sys_argv(monkeypatch):
    monkeypatch.setattr("sys.argv", ["train.py", "--seed", "7", "--bf16"])
    cfg = parse_args()
    assert cfg.training.seed == 7 and cfg.training.bf16 is True


def test_repeated_flag_last_wins():
    assert parse_args(["--seed", "1", "--seed", "2"]).training.seed == 2


# ----------------------------------------------------------------------------- flag errors


def test_misspelt_flag_suggests():
    with pytest.raises(ConfigError, match=r"unknown flag --learnig_rate; did you mean --learning_rate\?"):
        parse_args(["--learnig_rate", "1e-4"])


def test_unknown_flag_without_close_match():
    with pytest.raises(ConfigError) as info:
        parse_args(["--zzzqqq", "1"])
    assert "--help" in str(info.value) and "did you mean" not in str(info.value)


def test_config_error_is_value_error():
    assert issubclass(ConfigError, ValueError)


@pytest.mark.parametrize("argv,needle", [
    (["--output_dir", "--bf16"], "--output_dir needs a value"),
    (["--output_dir"], "--output_dir needs a value"),
    (["--learning_rate"], "--learning_rate needs a value"),
    (["--save_steps", "1.5"], "--save_steps"),
    (["--per_device_train_batch_size", "eight"], "--per_device_train_batch_size"),
    (["--learning_rate", "fast"], "--learning_rate"),
    (["output"], "positional"),
    (["--bf16", "True", "extra", "x"], "positional"),
    (["--seed", "1", "-5"], "positional"),
    (["--config", "a.yaml", "--config", "b.yaml"], "--config"),
])
def test_flag_errors(argv, needle):
    with pytest.raises(ConfigError, match=needle):
        parse_args(argv)


def test_int_flag_rejects_float_names_flag():
    with pytest.raises(ConfigError) as info:
        parse_args(["--max_steps", "1.5"])
    assert "--max_steps" in str(info.value) and "1.5" in str(info.value)


def test_help_lists_every_flag(capsys):
    for flag in ("--help", "-h"):
        with pytest.raises(SystemExit) as info:
            parse_args(["--bf16", flag])
        assert info.value.code == 0
    out = capsys.readouterr().out
    for spec_cls in (ModelArguments, DataArguments, TrainingArguments):
        for f in dataclasses.fields(spec_cls):
            assert f"--{f.name}" in out
            assert f.metadata["help"]
    assert "Model arguments" in out and "Training arguments" in out and "--stage" in out
    assert "--evaluation_strategy" in out


# ----------------------------------------------------------------------------- aliases


def test_evaluation_strategy_alias():
    assert parse_args(["--evaluation_strategy", "steps"]).training.eval_strategy == "steps"
    # Same value under both names is fine.
    cfg = parse_args(["--evaluation_strategy", "no", "--eval_strategy", "no"])
    assert cfg.training.eval_strategy == "no" and cfg.source_of("evaluation_strategy") == "flag"


def test_evaluation_strategy_conflict_names_both():
    with pytest.raises(ValueError) as info:
        parse_args(["--evaluation_strategy", "no", "--eval_strategy", "steps"])
    assert "--evaluation_strategy" in str(info.value) and "--eval_strategy" in str(info.value)


# ----------------------------------------------------------------------------- validation

VALIDATION_CASES = [
    (["--bf16", "True", "--fp16", "True"], ["--bf16", "--fp16"]),
    (["--per_device_train_batch_size", "0"], ["--per_device_train_batch_size"]),
    (["--per_device_eval_batch_size", "0"], ["--per_device_eval_batch_size"]),
    (["--gradient_accumulation_steps", "0"], ["--gradient_accumulation_steps"]),
    (["--logging_steps", "0"], ["--logging_steps"]),
    (["--learning_rate", "0"], ["--learning_rate"]),
    (["--learning_rate", "-1e-4"], ["--learning_rate"]),
    (["--num_train_epochs", "0"], ["--num_train_epochs"]),
    (["--max_steps", "0"], ["--max_steps"]),
    (["--max_steps", "-2"], ["--max_steps"]),
    (["--weight_decay", "-0.1"], ["--weight_decay"]),
    (["--warmup_ratio", "1.0"], ["--warmup_ratio"]),
    (["--warmup_ratio", "-0.1"], ["--warmup_ratio"]),
    (["--warmup_steps", "-1"], ["--warmup_steps"]),
    (["--max_grad_norm", "-1"], ["--max_grad_norm"]),
    (["--adam_beta1", "1.0"], ["--adam_beta1"]),
    (["--adam_beta2", "-0.5"], ["--adam_beta2"]),
    (["--model_max_length", "8"], ["--model_max_length"]),
    (["--lr_scheduler_type", "cosin"], ["--lr_scheduler_type", "cosine"]),
    (["--save_strategy", "always"], ["--save_strategy"]),
    (["--eval_strategy", "False"], ["--eval_strategy"]),
    (["--save_strategy", "steps", "--save_steps", "0"], ["--save_steps"]),
    (["--eval_steps", "0"], ["--eval_steps"]),
    (["--save_total_limit", "0"], ["--save_total_limit"]),
    (["--bits", "3"], ["--bits"]),
    (["--quant_type", "int4"], ["--quant_type"]),
    (["--lora_bias", "some"], ["--lora_bias"]),
    (["--zero3_frozen_parts", "replicated"], ["--zero3_frozen_parts", "whole", "partitioned"]),
    (["--lora_r", "0"], ["--lora_r"]),
    (["--lora_dropout", "1"], ["--lora_dropout"]),
    (["--image_aspect_ratio", "anyres"], ["--image_aspect_ratio"]),
    (["--mm_projector_type", "mlp0x_gelu"], ["--mm_projector_type", "linear"]),
    (["--mm_projector_type", "qformer"], ["--mm_projector_type"]),
    (["--report_to", "comet_ml"], ["--report_to"]),
    (["--report_to", "tensorboard,mlflow"], ["--report_to"]),
    (["--optim", "sgd"], ["--optim"]), (["--optim", "adamw"], ["--optim", "adamw_torch_fused"]),
    (["--ddp_timeout", "0"], ["--ddp_timeout"]),
    (["--dataloader_num_workers", "-1"], ["--dataloader_num_workers"]),
    (["--audio_prompt_finetune", "True"], ["--audio_prompt_finetune", "--audio_prompt_num"]),
    (["--audio_prompt_finetune", "--audio_prompt_num", "0"],
     ["--audio_prompt_finetune", "--audio_prompt_num"]),
    (["--tune_mm_mlp_adapter", "True", "--freeze_mm_mlp_adapter", "True"],
     ["--tune_mm_mlp_adapter", "--freeze_mm_mlp_adapter"]),
    (["--stage", ""], ["--stage"]),
]


@pytest.mark.parametrize("argv,flags", VALIDATION_CASES, ids=[" ".join(c[0]) for c in VALIDATION_CASES])
def test_validation_rejects(argv, flags):
    with pytest.raises(ValueError) as info:
        parse_args(argv)
    for flag in flags:
        assert flag in str(info.value)


def test_scheduler_message_lists_choices():
    with pytest.raises(ConfigError) as info:
        parse_args(["--lr_scheduler_type", "cosin"])
    assert str(info.value) == ("--lr_scheduler_type 'cosin' is not one of: linear, cosine, cosine_with_restarts, "
                               "polynomial, constant, constant_with_warmup, cosine_with_min_lr, warmup_stable_decay")


@pytest.mark.parametrize("argv", [
    ["--max_grad_norm", "0"], ["--max_steps", "10"], ["--warmup_ratio", "0"],
    ["--mm_projector_type", "linear"], ["--mm_projector_type", "identity"],
    ["--mm_projector_type", "mlp12x_gelu"], ["--report_to", "tensorboard"],
    ["--report_to", "none,tensorboard"], ["--report_to", "all"], ["--report_to", "wandb"],
    ["--report_to", "tensorboard,wandb"], ["--bits", "4", "--lora_enable", "True"],
    ["--image_aspect_ratio", "pad"], ["--save_strategy", "no", "--save_steps", "0"],
    ["--audio_prompt_finetune", "True", "--audio_prompt_num", "4"], ["--optim", "adamw_torch_fused"],
    ["--fp16", "True"], ["--stage", "3"],
])
def test_validation_accepts(argv):
    parse_args(argv)


def test_validate_collects_several_errors():
    cfg = RunConfig()
    cfg.training.learning_rate = 0.0
    cfg.training.optim = "sgd"
    with pytest.raises(ConfigError) as info:
        validate(cfg)
    assert "--learning_rate" in str(info.value) and "--optim" in str(info.value)


def test_validate_checks_types_of_programmatic_configs():
    cfg = RunConfig()
    cfg.training.learning_rate = "5e-4"
    with pytest.raises(ConfigError, match="--learning_rate"):
        validate(cfg)


# ----------------------------------------------------------------------------- YAML


def _write(tmp_path, text, name="run.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_flat_yaml_and_flags_override(tmp_path):
    path = _write(tmp_path, "learning_rate: 3e-3\nbf16: true\nsave_strategy: no\n"
                            "per_device_train_batch_size: 4\nstage: 2\ndataset_use: mix_a\n")
    cfg = parse_args(["--config", path, "--per_device_train_batch_size", "2"])
    t = cfg.training
    assert t.learning_rate == pytest.approx(3e-3) and t.bf16 is True
    assert t.save_strategy == "no"  # YAML 1.1's `no` -> False must not leak in
    assert t.per_device_train_batch_size == 2 and cfg.stage == "2"
    assert cfg.data.dataset_use == "mix_a"
    assert cfg.field_sources["learning_rate"] == "yaml"
    assert cfg.field_sources["per_device_train_batch_size"] == "flag"
    assert cfg.is_explicit("learning_rate") and not cfg.is_explicit("seed")


def test_sectioned_yaml(tmp_path):
    path = _write(tmp_path, """
model:
  model_type: qwen2p5_instruct
  tune_mm_mlp_adapter: yes
data:
  image_aspect_ratio: square
training:
  learning_rate: 5e-4
  evaluation_strategy: "no"
  report_to: none
  tf32: null
dry_run: true
""")
    cfg = parse_args([f"--config={path}", "--learning_rate", "1e-3"])
    assert cfg.model.model_type == "qwen2p5_instruct" and cfg.model.tune_mm_mlp_adapter is True
    assert cfg.data.image_aspect_ratio == "square"
    assert cfg.training.learning_rate == pytest.approx(1e-3)
    assert cfg.training.eval_strategy == "no" and cfg.training.report_to == "none"
    assert cfg.training.tf32 is None and cfg.dry_run is True
    assert cfg.source_of("model_type") == "yaml" and cfg.source_of("learning_rate") == "flag"


def test_yaml_values_are_validated(tmp_path):
    path = _write(tmp_path, "training:\n  lr_scheduler_type: cosin\n")
    with pytest.raises(ConfigError, match="--lr_scheduler_type"):
        parse_args(["--config", path])
    # ...unless a flag fixes the value before validation runs.
    parse_args(["--config", path, "--lr_scheduler_type", "cosine"])


def test_yaml_bad_value_names_key_and_file(tmp_path):
    path = _write(tmp_path, "save_steps: 1.5\n")
    with pytest.raises(ConfigError) as info:
        parse_args(["--config", path])
    assert "save_steps" in str(info.value) and path in str(info.value)


def test_unknown_yaml_key_suggests(tmp_path):
    path = _write(tmp_path, "training:\n  learnig_rate: 1e-4\n")
    with pytest.raises(ConfigError) as info:
        parse_args(["--config", path])
    msg = str(info.value)
    assert "learnig_rate" in msg and path in msg and "learning_rate" in msg


def test_yaml_key_in_wrong_section(tmp_path):
    path = _write(tmp_path, "model:\n  learning_rate: 1e-4\n")
    with pytest.raises(ConfigError, match="training"):
        load_yaml_config(path)


@pytest.mark.parametrize("text,needle", [
    ("learning_rate: [1, 2\nbf16: true\n", "line"),
    ("- just\n- a list\n", "mapping"),
    ("model: 3\n", "mapping"),
])
def test_malformed_yaml_names_file(tmp_path, text, needle):
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        parse_args(["--config", path])
    assert path in str(info.value) and needle in str(info.value)


def test_malformed_yaml_reports_line(tmp_path):
    path = _write(tmp_path, "seed: 1\nbf16: true\nlearning_rate: : 3\n")
    with pytest.raises(ConfigError, match="line 3"):
        load_yaml_config(path)


def test_missing_yaml_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        parse_args(["--config", str(tmp_path / "nope.yaml")])


def test_yaml_alias_conflict(tmp_path):
    path = _write(tmp_path, "evaluation_strategy: 'no'\neval_strategy: steps\n")
    with pytest.raises(ConfigError) as info:
        load_yaml_config(path)
    assert "evaluation_strategy" in str(info.value) and "eval_strategy" in str(info.value)


def test_yaml_round_trip(tmp_path):
    cfg = parse_args(shlex.split(VITA_PRETRAIN_MLP + PATH_FLAGS) + [
        "--learning_rate", "5e-4", "--adam_epsilon", "1e-10", "--mm_projector_lr", "2e-5",
        "--tf32", "None", "--save_total_limit", "None", "--report_to", "tensorboard,all",
        "--resume_from_checkpoint", "False", "--version", "1.0", "--stage", "2",
        "--dry_run", "--report_json", "r.json", "--audio_prompt_finetune", "--audio_prompt_num", "8",
        "--lora_weight_path", "", "--eval_strategy", "no", "--max_steps", "7",
    ])
    path = str(tmp_path / "out.yaml")
    cfg.to_yaml(path)
    back = load_yaml_config(path)
    assert back == cfg
    assert back.flat_dict() == cfg.flat_dict()
    for name, value in cfg.flat_dict().items():
        assert type(back.get(name)) is type(value), name
    assert back.training.learning_rate == 5e-4 and back.training.tf32 is None
    assert back.training.resume_from_checkpoint == "False" and back.model.version == "1.0"
    assert set(back.field_sources.values()) == {"yaml"}
    # The written file is sectioned and is itself accepted by --config.
    text = open(path).read()
    assert "model:" in text and "training:" in text
    assert parse_args(["--config", path]) == cfg


def test_round_trip_of_defaults(tmp_path):
    path = str(tmp_path / "d.yaml")
    RunConfig().to_yaml(path)
    assert load_yaml_config(path) == RunConfig()


def test_empty_yaml_is_empty_config(tmp_path):
    assert load_yaml_config(_write(tmp_path, "")) == RunConfig()


# ----------------------------------------------------------------------------- RunConfig helpers


def test_get_set_and_sources():
    cfg = RunConfig()
    cfg.set("learning_rate", 1e-3, "flag")
    assert cfg.get("learning_rate") == 1e-3 and cfg.is_explicit("learning_rate")
    cfg.set("bf16", True, "preset")
    assert cfg.training.bf16 is True and not cfg.is_explicit("bf16")
    assert cfg.source_of("bf16") == "preset"
    cfg.set("learning_rate", 2e-3)
    assert not cfg.is_explicit("learning_rate") and cfg.source_of("learning_rate") == "default"
    cfg.set("stage", "3", "yaml")
    assert cfg.stage == "3" and cfg.get("dataset_use") is None
    with pytest.raises(ConfigError, match="learning_rate"):
        cfg.get("learnig_rate")
    with pytest.raises(ConfigError):
        cfg.is_explicit("nope")


def test_to_dict_and_flat_dict():
    cfg = RunConfig()
    nested = cfg.to_dict()
    assert set(nested) == {"model", "data", "training", "stage", "dry_run", "report_json", "stage_file"}
    assert nested["training"]["learning_rate"] == 5e-5 and nested["model"]["mm_projector_type"]
    flat = cfg.flat_dict()
    sizes = sum(len(dataclasses.fields(c)) for c in (ModelArguments, DataArguments, TrainingArguments))
    assert len(flat) == sizes + 4  # stage, dry_run, report_json, stage_file
    assert flat["dataset_use"] is None and flat["stage"] is None


def test_field_names_unique_across_sections():
    names = [f.name for c in (ModelArguments, DataArguments, TrainingArguments) for f in
             dataclasses.fields(c)]
    assert len(names) == len(set(names))
