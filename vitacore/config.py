"""Run configuration: VITA's argument classes as plain dataclasses, plus parsing.

The fields mirror VITA's ``ModelArguments`` / ``DataArguments`` /
``TrainingArguments`` (and the HF-Trainer fields its stage scripts pass), so a
VITA ``finetune*.sh`` command line parses unchanged::

    cfg = parse_args(["--bf16", "True", "--learning_rate", "5e-4"])
    cfg.training.learning_rate  # 0.0005
    cfg.is_explicit("bf16")     # True: stage presets must not override it

``--config run.yaml`` loads YAML (flat or sectioned) first; flags override it.
"""

import sys
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Sequence

from vitacore import _flags, _validation
from vitacore._flags import ConfigError

__all__ = [
    "ConfigError", "DataArguments", "ModelArguments", "RunConfig", "TrainingArguments",
    "ignored_flag_notes", "load_yaml_config", "parse_args", "validate",
]

ignored_flag_notes = _validation.ignored_flag_notes


def _f(default: Any, help: str, literal: bool = False) -> Any:
    # `literal`: strings such as "none"/"False" are kept verbatim instead of becoming None.
    return field(default=default, metadata={"help": help, "literal": literal})


@dataclass
class ModelArguments:
    """Which model to build and which of its parts to train (VITA's ModelArguments)."""

    model_name_or_path: Optional[str] = _f(None, "HF id or local path of the base LLM")
    model_type: Optional[str] = _f(None, "LLM family, e.g. qwen2p5_instruct, mixtral-8x7b")
    version: Optional[str] = _f(None, "conversation template name")
    freeze_backbone: bool = _f(False, "freeze the LLM weights")
    tune_mm_mlp_adapter: bool = _f(False, "train only the vision projector (stage-1 pretraining)")
    tune_audio_mlp_adapter: bool = _f(False, "train only the audio adapter")
    audio_prompt_finetune: bool = _f(False, "train learnable audio prompt tokens")
    audio_prompt_num: Optional[int] = _f(None, "number of audio prompt tokens")
    audio_state_predictor_tuning: bool = _f(False, "train the audio state-predictor head")
    vision_tower: Optional[str] = _f(None, "path of the vision encoder (e.g. InternViT)")
    audio_encoder: Optional[str] = _f(None, "path of the audio encoder")
    freeze_audio_encoder: bool = _f(True, "keep the audio encoder frozen")
    freeze_audio_encoder_adapter: bool = _f(True, "keep the audio encoder's adapter frozen")
    unfreeze_vision_tower: bool = _f(False, "train the vision encoder too")
    use_s2: bool = _f(False, "multi-scale (S2) vision features")
    pretrain_audio_mlp_adapter: Optional[str] = _f(None, "checkpoint of a pretrained audio adapter")
    pretrain_mm_mlp_adapter: Optional[str] = _f(None, "checkpoint of a pretrained vision projector")
    mm_projector_type: str = _f("mlp2x_gelu", "vision projector: linear, identity or mlpNx_gelu")
    # LLaVA's flags: accepted with their meaning where VITA has one, refused with the reason otherwise.
    mm_vision_select_layer: Optional[int] = _f(None, "LLaVA's feature layer; vitacore takes VITA's per tower "
                                                     "(SigLIP/CLIP -2, InternViT -1) and refuses another")
    mm_use_im_start_end: bool = _f(False, "LLaVA's image start/end tokens (VITA has none: only False)")
    mm_use_im_patch_token: bool = _f(False, "LLaVA's image patch token (VITA has none: only False)")
    trust_remote_code: bool = _f(False, "allow running the Python files of a tower, encoder or export folder whose "
                                        "config.json has an auto_map (InternViT); only for folders you trust")


@dataclass
class DataArguments:
    """Where the training data comes from and how images are tiled (VITA's DataArguments)."""

    lazy_preprocess: bool = _f(False, "tokenize samples on the fly")
    is_multimodal: bool = _f(True, "samples may contain images/audio")
    image_folder: Optional[str] = _f(None, "folder of the images of records without a 'set' "
                                           "(None: the JSON file's folder)")
    image_aspect_ratio: Optional[str] = _f(None, "images are tiled for every value, as in VITA-1.5 (up to "
                                                "--max_dynamic_patch tiles + a thumbnail); pad: pad to a square "
                                                "with the mean colour first; square, dynamic, None: tile as is")
    # VITA's default "temp" crashes; None selects the embedded synthetic demo data.
    dataset_use: Optional[str] = _f(None, "dataset names in --data_registry, comma-separated "
                                          "(None and no --data_path: built-in synthetic demo data)")
    # VITA keeps its registry in Python source; vitacore reads the same layout from YAML.
    data_registry: Optional[str] = _f(None, "YAML file mapping each --dataset_use name to its JSON files "
                                            "and media folders")
    data_path: Optional[str] = _f(None, "VITA JSON training file(s), comma-separated (instead of "
                                        "--data_registry / --dataset_use)")
    audio_folder: Optional[str] = _f(None, "folder of the audio files (None: the JSON file's folder)")
    video_folder: Optional[str] = _f(None, "folder of the video files (None: the JSON file's folder)")
    min_dynamic_patch: int = _f(1, "fewest image tiles per image")
    max_dynamic_patch: int = _f(12, "most image tiles per image (1: no tiling, one resized image)")
    use_thumbnail: bool = _f(True, "add a thumbnail tile to tiled images")
    eval_data_path: Optional[str] = _f(None, "evaluation data (None: no eval set)")
    system_prompts: Optional[str] = _f(None, "YAML file of system prompts by modality (image, video, lang) "
                                             "replacing the template's")
    on_bad_sample: str = _f("skip", "a record with a missing/corrupt media file, no answer, or too long: "
                                    "error (stop, naming it) or skip (use the next good record, count it)")
    max_bad_sample_ratio: float = _f(0.01, "stop the run once more than this share of the samples seen "
                                           "were bad (--on_bad_sample skip); checked only once "
                                           "--min_samples_for_bad_ratio samples were seen")
    min_samples_for_bad_ratio: int = _f(200, "samples (over all ranks) seen before --max_bad_sample_ratio "
                                             "applies, so one early bad record does not stop a large run")
    max_image_pixels: int = _f(89_478_485, "an image (or GIF frame) with more pixels is a bad sample, "
                                           "refused before it is decoded")
    max_images_per_record: int = _f(64, "a record with more images (or <image> placeholders) is a bad sample")
    max_tiles_per_record: int = _f(256, "a record whose images tile into more tiles is a bad sample")
    max_video_frames_decoded: int = _f(20_000, "a video needing more decoded frames is a bad sample")
    max_animation_frames: int = _f(1_000, "an animated image (GIF, WebP) with more frames is a bad sample")
    max_audio_sample_rate: int = _f(192_000, "an audio file whose header claims a higher rate (Hz) is a bad sample")
    max_audio_seconds: float = _f(600.0, "an audio file longer than this is a bad sample")
    restrict_media_paths: bool = _f(False, "a media path that resolves outside its declared folder "
                                           "(--image_folder, a registry set's folder, ...) is a bad sample")
    length_cache_dir: Optional[str] = _f(None, "folder of the per-record token-length cache (None: a "
                                               ".vitacore_lengths folder beside the first data file, or the "
                                               "output folder when that one is not writable)")


@dataclass
class TrainingArguments:
    """VITA's training additions followed by the standard HF-Trainer fields its scripts use."""

    cache_dir: Optional[str] = _f(None, "HF download cache directory")
    optim: str = _f("adamw_torch", "optimizer: adamw_torch (torch.optim.AdamW) or adamw_torch_fused (fused=True)")
    remove_unused_columns: bool = _f(False, "HF compatibility; ignored")
    freeze_mm_mlp_adapter: bool = _f(False, "keep the vision projector frozen")
    mpt_attn_impl: str = _f("triton", "MPT attention implementation (VITA compatibility)")
    model_max_length: int = _f(512, "maximum sequence length in tokens")
    double_quant: bool = _f(True, "nested quantization for 4-bit loading")
    quant_type: str = _f("nf4", "4-bit quantization type: nf4 or fp4")
    bits: int = _f(16, "weight precision to load the LLM in: 4, 8 or 16")
    lora_enable: bool = _f(False, "train LoRA adapters instead of full weights")
    lora_r: int = _f(64, "LoRA rank")
    lora_alpha: int = _f(16, "LoRA scaling alpha")
    lora_dropout: float = _f(0.05, "LoRA dropout probability")
    lora_weight_path: str = _f("", "folder of a saved PEFT adapter (adapter_model.safetensors) to start from")
    lora_bias: str = _f("none", "LoRA bias training: none, all or lora_only")
    lora_target_modules: str = _f("", "comma-separated LLM module names LoRA adapts, e.g. q_proj,v_proj "
                                      "(empty: every Linear layer of the LLM except lm_head, as VITA does)")
    mm_projector_lr: Optional[float] = _f(None, "learning rate of the vision projector (None: --learning_rate)")
    vision_tower_lr: Optional[float] = _f(None, "learning rate of the vision tower (None: --mm_projector_lr)")
    unit_lr: Optional[str] = _f(None, "per-unit learning rates, e.g. audio_adapter=1e-4,llm=1e-5")
    trainable_regex: Optional[str] = _f(None, "also train parameters whose name matches (re.search)")
    frozen_regex: Optional[str] = _f(None, "freeze parameters whose name matches; wins over everything")
    group_by_modality_length: bool = _f(False, "batch samples of the same modality together")
    packing: bool = _f(False, "pack several samples into each row (up to --packing_max_length tokens after media "
                              "expansion); each sample attends only to itself")
    packing_max_length: Optional[int] = _f(None, "longest packed row in tokens (None: --model_max_length)")
    zero3_frozen_parts: str = _f("whole", "under ZeRO-3, frozen encoders and adapters: whole on every rank (no "
                                          "gathers, no dummy passes) or partitioned (less memory)")
    loss_chunk_size: int = _f(1024, "tokens per chunk of the output head + cross-entropy, so full-sequence logits "
                                    "are never built (0: the LLM's own loss over full logits)")
    output_dir: str = _f("output", "where checkpoints and logs go")
    num_train_epochs: float = _f(1.0, "number of passes over the data")
    max_steps: int = _f(-1, "stop after this many optimizer steps (-1: use epochs)")
    per_device_train_batch_size: int = _f(8, "training micro-batch per GPU")
    per_device_eval_batch_size: int = _f(8, "evaluation batch per GPU")
    gradient_accumulation_steps: int = _f(1, "micro-batches per optimizer step")
    learning_rate: float = _f(5e-5, "peak learning rate")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    adam_beta1: float = _f(0.9, "AdamW beta1")
    adam_beta2: float = _f(0.999, "AdamW beta2")
    adam_epsilon: float = _f(1e-8, "AdamW epsilon")
    max_grad_norm: float = _f(1.0, "gradient clipping norm (0: no clipping)")
    lr_scheduler_type: str = _f("linear", "a schedule of transformers' get_scheduler: linear, cosine, "
                                          "cosine_with_restarts, polynomial, constant, constant_with_warmup, "
                                          "cosine_with_min_lr or warmup_stable_decay")
    lr_scheduler_kwargs: Optional[str] = _f(None, "JSON object of the schedule's extra arguments, as get_scheduler "
                                                  "takes them (e.g. '{\"num_cycles\": 2}', '{\"min_lr_rate\": 0.1}')",
                                            literal=True)
    warmup_ratio: float = _f(0.0, "fraction of steps spent warming up")
    warmup_steps: int = _f(0, "warm-up steps (overrides warmup_ratio when > 0)")
    logging_steps: int = _f(10, "log every N optimizer steps")
    save_strategy: str = _f("steps", "when to checkpoint: no, steps or epoch", literal=True)
    save_steps: int = _f(500, "checkpoint every N steps")
    save_total_limit: Optional[int] = _f(None, "keep at most N checkpoints")
    eval_strategy: str = _f("no", "when to evaluate: no, steps or epoch", literal=True)
    eval_steps: Optional[int] = _f(None, "evaluate every N steps (None: logging_steps)")
    bf16: bool = _f(False, "bfloat16 mixed precision")
    fp16: bool = _f(False, "float16 mixed precision")
    tf32: Optional[bool] = _f(None, "allow TF32 matmuls on Ampere+ GPUs")
    gradient_checkpointing: bool = _f(False, "recompute activations to save memory")
    dataloader_num_workers: int = _f(0, "data loader worker processes")
    dataloader_persistent_workers: bool = _f(
        False, "keep the training loader's workers alive between epochs (needs dataloader_num_workers > 0)")
    dataloader_prefetch_factor: Optional[int] = _f(
        None, "batches each worker loads ahead (needs dataloader_num_workers > 0; None: torch's default, 2)")
    report_to: str = _f("none", "none, tensorboard, wandb, all, or a comma-separated list of them", literal=True)
    run_name: Optional[str] = _f(None, "the run's name in trackers (None: the output folder's name)", literal=True)
    plot_loss: bool = _f(True, "draw training_curves.png beside metrics.jsonl at each checkpoint and at the end")
    eval_generate: bool = _f(False, "evaluation also generates each answer (greedy): exact match and token F1 "
                                    "join the eval rows")
    deepspeed: Optional[str] = _f(None, "DeepSpeed JSON config (path or name)")
    seed: int = _f(42, "random seed")
    skip_nonfinite_steps: int = _f(0, "skip up to N micro-batches whose loss is NaN/inf, or optimizer steps whose "
                                      "gradient norm is (0: stop at the first)")
    allow_resume_changes: Optional[str] = _f(None, "flags that may differ from the checkpoint's config.yaml when "
                                                   "resuming, comma-separated (e.g. learning_rate,max_steps); "
                                                   "others refuse the resume", literal=True)
    resume_from_checkpoint: Optional[str] = _f(
        None, "checkpoint path, or True/False (kept verbatim)", literal=True)
    local_rank: int = _f(-1, "set by the distributed launcher")
    ddp_timeout: int = _f(1800, "distributed timeout in seconds")


# Old HF spelling -> field.
_ALIASES = {"evaluation_strategy": "eval_strategy"}
_EXPLICIT_SOURCES = ("flag", "yaml")


@dataclass
class RunConfig:
    """Everything one vitacore run needs, plus where each explicitly set value came from.

    Attributes:
        field_sources: Field name -> "flag" or "yaml" for values the user set (other
            labels, e.g. "preset", may be recorded via :meth:`set` and are not explicit);
            fields absent from it hold defaults. Not part of equality.
    """

    model: ModelArguments = field(default_factory=ModelArguments)
    data: DataArguments = field(default_factory=DataArguments)
    training: TrainingArguments = field(default_factory=TrainingArguments)
    stage: Optional[str] = _f(None, "stage preset to apply (1, 2, 3, 4, neg, fo, all, none, or a --stage_file "
                                    "stage); None: 1 with the embedded default, none (the flags alone decide, "
                                    "as in VITA) with your own --model_name_or_path", literal=True)
    dry_run: bool = _f(False, "build everything, run no optimizer step")
    report_json: Optional[str] = _f(None, "write a JSON run report to this path")
    stage_file: Optional[str] = _f(None, "YAML file defining extra stages for --stage")
    field_sources: Dict[str, str] = field(default_factory=dict, compare=False, repr=False)

    def _owner(self, name: str) -> Any:
        spec = _spec(name)
        return self if spec.section == "run" else getattr(self, spec.section)

    def get(self, name: str) -> Any:
        """Returns the value of a field, whichever section declares it.

        Raises:
            ConfigError: No field has that name.
        """
        return getattr(self._owner(name), name)

    def set(self, name: str, value: Any, source: Optional[str] = None) -> None:
        """Sets a field in whichever section declares it.

        Args:
            name: Field name (aliases such as ``evaluation_strategy`` are accepted).
            value: Already-typed value; it is not converted.
            source: "flag" or "yaml" marks the value as user-set; any other label
                (e.g. "preset") is recorded but not explicit; None forgets the source,
                so the value counts as a default.
        """
        name = _ALIASES.get(name, name)
        setattr(self._owner(name), name, value)
        if source is None:
            self.field_sources.pop(name, None)
        else:
            self.field_sources[name] = source

    def is_explicit(self, name: str) -> bool:
        """Whether the user set ``name`` with a flag or in the YAML file."""
        name = _ALIASES.get(name, name)
        _spec(name)  # typos in preset code should fail loudly
        return self.field_sources.get(name) in _EXPLICIT_SOURCES

    def source_of(self, name: str) -> str:
        """Returns "flag", "yaml", another recorded label, or "default"."""
        name = _ALIASES.get(name, name)
        _spec(name)
        return self.field_sources.get(name, "default")

    def to_dict(self) -> Dict[str, Any]:
        """Returns ``{"model": {...}, "data": {...}, "training": {...}, <run fields>}``."""
        out: Dict[str, Any] = {sec: {} for sec in _SECTIONS}
        for spec in _SPECS.values():
            value = getattr(self._owner(spec.name), spec.name)
            (out if spec.section == "run" else out[spec.section])[spec.name] = value
        return out

    def flat_dict(self) -> Dict[str, Any]:
        """Returns every field, all sections merged into one mapping."""
        return {name: self.get(name) for name in _SPECS}

    def to_yaml(self, path: str) -> None:
        """Writes the sectioned YAML form that ``--config`` / :func:`load_yaml_config` read."""
        _flags.dump_yaml(self.to_dict(), path, header="# vitacore run config\n")


_SECTIONS = {"model": ModelArguments, "data": DataArguments, "training": TrainingArguments}
_SPECS: Dict[str, _flags.FlagSpec] = {}
for _sec, _cls in list(_SECTIONS.items()) + [("run", RunConfig)]:
    for _s in _flags.specs_for(_cls, _sec, exclude=(*_SECTIONS, "field_sources")):
        # get()/set()/flat YAML rely on every name being unique across sections.
        assert _s.name not in _SPECS and _s.name not in _SECTIONS, f"duplicate field {_s.name}"
        _SPECS[_s.name] = _s
assert not set(_ALIASES) & set(_SPECS)
del _sec, _cls, _s

# Normalised flag name -> (field or pseudo-flag, is_bool), for the argv splitter.
_LOOKUP = {n: (n, s.kind is bool) for n, s in _SPECS.items()}
_LOOKUP.update({a: (n, _SPECS[n].kind is bool) for a, n in _ALIASES.items()})
_LOOKUP["config"] = ("config", False)


def _spec(name: str) -> _flags.FlagSpec:
    try:
        return _SPECS[name]
    except KeyError:
        raise ConfigError(f"no config field named {name!r}{_flags.suggestion(name, _SPECS, '')}"
                          ) from None


def _apply(cfg: RunConfig, entries: Sequence[tuple], source: str) -> None:
    """Converts and stores ``(field, raw, where, spelling)`` entries; later ones win."""
    seen: Dict[str, Dict[str, tuple]] = {}
    for name, raw, where, spelling in entries:
        value = _flags.convert(_SPECS[name], raw, where)
        by_spelling = seen.setdefault(name, {})
        by_spelling[spelling] = (value, where)
        # Repeating a flag is "last wins"; old and new spelling disagreeing is a mistake.
        for other, (other_value, other_where) in by_spelling.items():
            if other != spelling and other_value != value:
                old = next(a for a, n in _ALIASES.items() if n == name)
                raise ConfigError(f"{other_where} {other_value!r} conflicts with {where} {value!r};"
                                  f" give only one (--{old} is the old name of --{name})")
        cfg.set(name, value, source)


def load_yaml_config(path: str) -> RunConfig:
    """Loads a YAML run config (flat or sectioned) and validates it.

    Args:
        path: YAML file, e.g. one written by :meth:`RunConfig.to_yaml`.

    Returns:
        The config; every key in the file is recorded as source "yaml".

    Raises:
        ConfigError: Unreadable file, unknown key, bad value or failed validation.
    """
    cfg = RunConfig()
    _apply(cfg, _flags.yaml_entries(path, _SPECS, _ALIASES, _SECTIONS), "yaml")
    validate(cfg)
    return cfg


def help_text() -> str:
    """Returns the ``--help`` text: every flag grouped by section."""
    groups = [(f"{sec.capitalize()} arguments", [s for s in _SPECS.values() if s.section == sec])
              for sec in (*_SECTIONS, "run")]
    intro = ("usage: [--config FILE.yaml] [--FLAG VALUE | --FLAG=VALUE ...]\n"
             "Booleans take True/False (a bare --FLAG means True); dashes may replace "
             "underscores;\n--config loads YAML (flat or sectioned) that later flags override.")
    return _flags.format_help(groups, _ALIASES, intro)


def parse_args(argv: Optional[Sequence[str]] = None) -> RunConfig:
    """Parses VITA-style command-line flags (and an optional ``--config`` YAML).

    Args:
        argv: Tokens without the program name; None reads ``sys.argv[1:]``.

    Returns:
        A validated :class:`RunConfig` whose ``field_sources`` says which values
        came from flags and which from the YAML file.

    Raises:
        ConfigError: Unknown flag (with a suggestion), bad value or failed validation.
        SystemExit: With code 0 after printing help for ``--help`` / ``-h``.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if "--help" in args or "-h" in args:
        print(help_text())
        raise SystemExit(0)
    entries = _flags.split_argv(args, _LOOKUP)
    configs = [raw for name, raw, _ in entries if name == "config"]
    if len(configs) > 1:
        raise ConfigError(f"--config given {len(configs)} times; give one YAML file")
    cfg = RunConfig()
    if configs:
        _apply(cfg, _flags.yaml_entries(configs[0], _SPECS, _ALIASES, _SECTIONS), "yaml")
    _apply(cfg, [(n, raw, flag, flag[2:].replace("-", "_")) for n, raw, flag in entries
                 if n != "config"], "flag")
    validate(cfg)
    return cfg


def validate(cfg: RunConfig) -> None:
    """Checks types, ranges and combinations of a config.

    Args:
        cfg: The config to check.

    Raises:
        ConfigError: Lists every problem, each naming the flag, the value and what
            is allowed (one problem: just its message).
    """
    errors = [e for e in (_flags.type_error(s, cfg.get(n)) for n, s in _SPECS.items()) if e]
    if not errors:
        errors = _validation.rule_errors(cfg)
    if len(errors) == 1:
        raise ConfigError(errors[0])
    if errors:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(errors))
