"""The run's model: which LLM family it is, which weights it starts from, and which builder composes it."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Optional

from vitacore.checkpoint import (
    llm_config_for,
    load_export_bundle,
    read_adapter_file,
    read_export_config,
    read_lora_weights,
)
from vitacore.checkpoint.export.reader import check_export_trust
from vitacore.config import RunConfig
from vitacore.data import ModelInputs, audio_transform_for, get_template
from vitacore.demo import DefaultAssets, ensure_default_assets
from vitacore.model import (
    INFERRED_SOURCE,
    ModelBundle,
    ModelSpec,
    StartWeights,
    VitaModel,
    build_model,
    infer_model_type,
)
from vitacore.model.vision import check_tower_trust
from vitacore.recipes.specs import model_spec


@dataclass(frozen=True)
class ModelPlan:
    """What a run's model will be, known before any weight is read.

    Attributes:
        config: the run config with ``--model_type`` / ``--version`` resolved for the LLM.
        exported: ``--model_name_or_path``'s config.json when it is a VITA-layout folder (else None).
        assets: the embedded default, where the run takes parts (or data) from it (else None).
        hidden_size: the LLM's hidden size (sizes DeepSpeed's buckets).
    """

    config: RunConfig
    exported: Optional[dict]
    assets: Optional[DefaultAssets]
    hidden_size: int


def plan_model(config: RunConfig, with_data: bool = True) -> ModelPlan:
    """Read the LLM's config (no weights), infer its model type, and build the embedded default when needed.

    The embedded default is needed for a run without ``--model_name_or_path`` (its parts stand in
    for those without a path) and, when ``with_data``, for a run without data flags (its synthetic
    data). A run with its own LLM takes no part from it: a part without a path is absent.
    """
    m, d = config.model, config.data
    exported = read_export_config(m.model_name_or_path)
    model_complete = exported is not None or bool(m.model_name_or_path)
    needs_assets = not model_complete or (with_data and not (d.data_path or d.dataset_use))
    assets = ensure_default_assets() if needs_assets else None
    llm_path = m.model_name_or_path or assets.llm
    llm_config = llm_config_for(llm_path, exported)
    llm_type = exported.get("model_type") if exported is not None else llm_config.model_type
    return ModelPlan(with_model_type(config, llm_type, llm_path), exported, assets, llm_config.hidden_size)


def with_model_type(config: RunConfig, llm_model_type: str, llm_path: str) -> RunConfig:
    """A copy of ``config`` whose ``--model_type`` / ``--version`` fit the LLM, inferred where the user set neither.

    Inferred values are recorded with the source "inferred from the LLM's config" (never explicit, so
    rebuilding from the saved config.yaml infers the same again). The decisions are logged.

    Raises:
        ValueError: an unknown ``--model_type`` or ``--version``, or an LLM family that needs one of them.
    """
    m = config.model
    choice = infer_model_type(llm_model_type, llm_path, m.model_type, m.version, config.is_explicit("model_type"),
                              config.is_explicit("version"), config.source_of("model_type"))
    resolved = copy.deepcopy(config)
    for name in choice.inferred:
        resolved.set(name, getattr(choice, name), INFERRED_SOURCE)
    get_template(resolved.model.version)  # an unknown --version fails here, before any weights load
    return resolved


def start_weights(config: RunConfig) -> StartWeights:
    """The adapter and LoRA weights the flags name, read from their files (``--pretrain_mm_mlp_adapter``,
    ``--pretrain_audio_mlp_adapter``, ``--lora_weight_path``).

    Raises:
        FileNotFoundError / ValueError: a file that is missing or holds no such adapter, naming the flag.
    """
    m, t = config.model, config.training
    projector = audio_adapter = lora = None
    if m.pretrain_mm_mlp_adapter:
        projector = read_adapter_file(m.pretrain_mm_mlp_adapter, "mm_projector.", "--pretrain_mm_mlp_adapter")
    if m.pretrain_audio_mlp_adapter:
        audio_adapter = read_adapter_file(m.pretrain_audio_mlp_adapter, "audio_encoder.adpter.",
                                          "--pretrain_audio_mlp_adapter")
    if t.lora_enable and t.lora_weight_path:
        lora = read_lora_weights(t.lora_weight_path)
    return StartWeights(projector, audio_adapter, lora)


def check_remote_code(spec: ModelSpec, exported: Optional[dict]) -> None:
    """Refuse a tower folder that holds code (``auto_map``: InternViT) without ``--trust_remote_code``,
    before any weight loads or any file of the folder is imported (only config.json is read, as JSON).

    Raises:
        ValueError: naming the folder, the flag and the Python files that would run.
    """
    if exported is not None:
        check_export_trust(spec, exported)
    elif spec.vision_tower_path:
        check_tower_trust(spec.vision_tower_path, spec.trust_remote_code)


def build_run_model(spec: ModelSpec, exported: Optional[dict], start: StartWeights,
                    deepspeed_config: Optional[dict]) -> ModelBundle:
    """The model and tokenizer: from a VITA-layout folder (``exported``: its config.json) or from part folders.

    Raises:
        ValueError: a tower whose code needs ``--trust_remote_code`` (checked first), or parts that do not load.
    """
    check_remote_code(spec, exported)
    if exported is not None:
        return load_export_bundle(spec, exported, start, deepspeed_config)
    return build_model(spec, start, deepspeed_config)


def build_model_from_config(config: RunConfig, deepspeed_config: Optional[dict] = None
                            ) -> tuple[ModelBundle, RunConfig]:
    """The model a run config describes, built as a stage run builds it (tools, tests, notebooks).

    Returns:
        ``(bundle, config)``: the model and tokenizer, and the config with its model type resolved.
    """
    plan = plan_model(config, with_data=False)
    spec = model_spec(plan.config, plan.assets, from_export=plan.exported is not None)
    return build_run_model(spec, plan.exported, start_weights(plan.config), deepspeed_config), plan.config


def check_select_layer(select_layer: Optional[int], tower) -> None:
    """LLaVA's ``--mm_vision_select_layer`` must name the hidden layer vitacore takes for this tower (VITA's).

    Raises:
        ValueError: another layer, naming the flag, both layers and the tower.
    """
    if select_layer is None or tower is None:
        return
    num_states = tower.encoder.config.num_hidden_layers + 1  # hidden_states: the embeddings, then each layer
    if not -num_states <= select_layer < num_states or select_layer % num_states != tower.select_layer % num_states:
        raise ValueError(f"--mm_vision_select_layer {select_layer}: vitacore takes layer {tower.select_layer} of "
                         f"this tower ({tower.source}), as VITA does, and no other; drop the flag or pass "
                         f"{tower.select_layer}")


def model_inputs(model: VitaModel) -> ModelInputs:
    """What the model's encoders take, for the data pipeline: the tower's image size and normalization
    and tokens per image, and the audio encoder's features (fbank or Whisper's log-mel) and token counts."""
    tower, encoder = model.vision_tower, model.audio_encoder
    audio = None
    if encoder is not None:
        audio = audio_transform_for(encoder.num_mel_bins, getattr(encoder, "feature_extractor", None),
                                    getattr(encoder, "fbank_settings", None),
                                    getattr(model.audio_adapter, "time_stride", 2))
    return ModelInputs(image_spec=tower.image_spec if tower is not None else None,
                       tokens_per_image=tower.num_tokens_per_image if tower is not None else None,
                       audio_transform=audio)
