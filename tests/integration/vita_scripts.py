"""VITA-1.5's six Qwen stage scripts as data: their train.py flags verbatim, and tiny local stand-ins for their paths.

Each flag list is the script's ``vita/train/train.py`` argument list in the script's order, as the shell hands
it to train.py (quotes removed: ``--evaluation_strategy "no"`` arrives as ``no``). Only the paths differ: they
are ``{placeholders}`` that :func:`script_argv` fills with the tiny folders of :func:`write_stand_ins`.
"""

import json
import os

import torch
from vita_deepspeed import vita_zero3

SCRIPTS = {
    # script/train/pretrain_mlp_qwen.sh
    "pretrain_mlp_qwen": [
        "--deepspeed", "{zero3}", "--model_name_or_path", "{qwen}", "--model_type", "qwen2p5_instruct",
        "--version", "qwen2p5_instruct", "--dataset_use", "Pretrain_video0", "--vision_tower", "{siglip}",
        "--mm_projector_type", "mlp2x_gelu", "--tune_mm_mlp_adapter", "True", "--audio_encoder", "{audio}",
        "--freeze_audio_encoder", "True", "--freeze_audio_encoder_adapter", "True", "--image_aspect_ratio", "square",
        "--group_by_modality_length", "False", "--bf16", "True", "--output_dir", "{output_dir}",
        "--num_train_epochs", "1", "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "4",
        "--gradient_accumulation_steps", "2", "--evaluation_strategy", "no", "--save_strategy", "steps",
        "--save_steps", "500", "--save_total_limit", "1", "--learning_rate", "5e-4", "--weight_decay", "0.",
        "--warmup_ratio", "0.03", "--lr_scheduler_type", "cosine", "--logging_steps", "1", "--tf32", "True",
        "--model_max_length", "6200", "--gradient_checkpointing", "True", "--dataloader_num_workers", "0",
        "--lazy_preprocess", "True", "--report_to", "none",
    ],
    # script/train/pretrain_audio_mlp_qwen.sh
    "pretrain_audio_mlp_qwen": [
        "--deepspeed", "{zero3}", "--model_name_or_path", "{qwen}", "--model_type", "qwen2p5_instruct",
        "--version", "qwen2p5_instruct", "--dataset_use", "Pretrain_audio", "--vision_tower", "{internvit}",
        "--mm_projector_type", "mlp2x_gelu", "--tune_mm_mlp_adapter", "False", "--tune_audio_mlp_adapter", "True",
        "--audio_encoder", "{audio}", "--freeze_audio_encoder", "True", "--freeze_audio_encoder_adapter", "False",
        "--image_aspect_ratio", "square", "--group_by_modality_length", "False", "--bf16", "True",
        "--output_dir", "{output_dir}", "--num_train_epochs", "1", "--per_device_train_batch_size", "8",
        "--per_device_eval_batch_size", "4", "--gradient_accumulation_steps", "2", "--evaluation_strategy", "no",
        "--save_strategy", "steps", "--save_steps", "200", "--save_total_limit", "1", "--learning_rate", "5e-4",
        "--weight_decay", "0.", "--warmup_ratio", "0.03", "--lr_scheduler_type", "cosine", "--logging_steps", "1",
        "--tf32", "True", "--model_max_length", "6200", "--gradient_checkpointing", "True",
        "--dataloader_num_workers", "4", "--lazy_preprocess", "True", "--report_to", "none",
    ],
    # script/train/finetune_qwen.sh
    "finetune_qwen": [
        "--deepspeed", "{zero3}", "--model_name_or_path", "{qwen}", "--model_type", "qwen2p5_instruct",
        "--version", "qwen2p5_instruct", "--dataset_use", "Pretrain_video0", "--vision_tower", "{internvit}",
        "--pretrain_mm_mlp_adapter", "{mm_projector}", "--mm_projector_type", "mlp2x_gelu",
        "--audio_encoder", "{audio}", "--freeze_audio_encoder", "True", "--freeze_audio_encoder_adapter", "True",
        "--unfreeze_vision_tower", "True", "--mm_projector_lr", "2e-6", "--image_aspect_ratio", "square",
        "--group_by_modality_length", "False", "--bf16", "True", "--output_dir", "{output_dir}",
        "--num_train_epochs", "1", "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "4",
        "--gradient_accumulation_steps", "2", "--evaluation_strategy", "no", "--save_strategy", "steps",
        "--save_steps", "500", "--save_total_limit", "1", "--learning_rate", "2e-5", "--weight_decay", "0.",
        "--warmup_ratio", "0.03", "--lr_scheduler_type", "cosine", "--logging_steps", "1", "--tf32", "True",
        "--model_max_length", "6200", "--gradient_checkpointing", "True", "--dataloader_num_workers", "4",
        "--lazy_preprocess", "True", "--report_to", "none",
    ],
    # script/train/finetuneTask_qwen.sh
    "finetuneTask_qwen": [
        "--deepspeed", "{zero3}", "--model_name_or_path", "{qwen}", "--model_type", "qwen2p5_instruct",
        "--version", "qwen2p5_instruct", "--dataset_use", "Pretrain_video0", "--vision_tower", "{internvit}",
        "--mm_projector_type", "mlp2x_gelu", "--audio_encoder", "{audio}", "--freeze_audio_encoder", "True",
        "--freeze_audio_encoder_adapter", "True", "--image_aspect_ratio", "square",
        "--group_by_modality_length", "False", "--bf16", "True", "--output_dir", "{output_dir}",
        "--num_train_epochs", "1", "--per_device_train_batch_size", "1", "--per_device_eval_batch_size", "4",
        "--gradient_accumulation_steps", "2", "--evaluation_strategy", "no", "--save_strategy", "steps",
        "--save_steps", "500", "--save_total_limit", "1", "--learning_rate", "2e-5", "--weight_decay", "0.",
        "--warmup_ratio", "0.03", "--lr_scheduler_type", "cosine", "--logging_steps", "1", "--tf32", "True",
        "--model_max_length", "33300", "--gradient_checkpointing", "True", "--dataloader_num_workers", "4",
        "--lazy_preprocess", "True", "--report_to", "none",
    ],
    # script/train/finetuneTaskNeg_qwen.sh
    "finetuneTaskNeg_qwen": [
        "--deepspeed", "{zero3}", "--model_name_or_path", "{qwen}", "--model_type", "qwen2p5_instruct",
        "--version", "qwen2p5_instruct", "--dataset_use", "Pretrain_video", "--vision_tower", "{internvit}",
        "--mm_projector_type", "mlp2x_gelu", "--audio_encoder", "{audio}", "--freeze_audio_encoder", "True",
        "--freeze_audio_encoder_adapter", "False", "--image_aspect_ratio", "square",
        "--group_by_modality_length", "False", "--bf16", "True", "--output_dir", "{output_dir}",
        "--num_train_epochs", "1", "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "4",
        "--gradient_accumulation_steps", "2", "--evaluation_strategy", "no", "--save_strategy", "steps",
        "--save_steps", "500", "--save_total_limit", "1", "--learning_rate", "2e-5", "--weight_decay", "0.",
        "--warmup_ratio", "0.03", "--lr_scheduler_type", "cosine", "--logging_steps", "1", "--tf32", "True",
        "--model_max_length", "6200", "--gradient_checkpointing", "True", "--dataloader_num_workers", "4",
        "--lazy_preprocess", "True", "--report_to", "none",
    ],
    # script/train/finetuneTaskNeg_qwen_fo.sh (MODEL_TYPE=qwen2p5_fo_instruct)
    "finetuneTaskNeg_qwen_fo": [
        "--deepspeed", "{zero3}", "--model_name_or_path", "{qwen}", "--model_type", "qwen2p5_fo_instruct",
        "--version", "qwen2p5_instruct", "--dataset_use", "Pretrain_video", "--vision_tower", "{internvit}",
        "--mm_projector_type", "mlp2x_gelu", "--audio_encoder", "{audio}", "--freeze_audio_encoder", "True",
        "--freeze_audio_encoder_adapter", "True", "--audio_prompt_finetune", "True", "--audio_prompt_num", "25",
        "--audio_state_predictor_tuning", "False", "--image_aspect_ratio", "square",
        "--group_by_modality_length", "False", "--bf16", "True", "--output_dir", "{output_dir}",
        "--num_train_epochs", "1", "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "4",
        "--gradient_accumulation_steps", "2", "--evaluation_strategy", "no", "--save_strategy", "steps",
        "--save_steps", "500", "--save_total_limit", "1", "--learning_rate", "1e-4", "--weight_decay", "0.",
        "--warmup_ratio", "0.03", "--lr_scheduler_type", "cosine", "--logging_steps", "1", "--tf32", "True",
        "--model_max_length", "6200", "--gradient_checkpointing", "True", "--dataloader_num_workers", "4",
        "--lazy_preprocess", "True", "--report_to", "none",
    ],
}

# VITA's InternVITVisionTower.hidden_size is config.hidden_size * (1 / scale_pix_shuffle) ** 2 with
# scale_pix_shuffle 0.5 (internvit_encoder.py:99-101): the projector reads 4x the tower's width.
INTERNVIT_PIXEL_SHUFFLE = 4
RECORD = {"id": "0", "conversations": [{"from": "human", "value": "Say hello."}, {"from": "gpt", "value": "Hello."}]}
DATASETS = ("Pretrain_video0", "Pretrain_audio", "Pretrain_video")


def _hidden_size(folder) -> int:
    with open(os.path.join(folder, "config.json")) as fh:
        return json.load(fh)["hidden_size"]


def write_vita_projector(path, tower_folder, llm_folder, tower_factor: int = 1) -> str:
    """A stage-1 ``mm_projector.bin`` in VITA's keys: mlp2x_gelu from the tower's width to the LLM's."""
    mm_hidden, hidden = tower_factor * _hidden_size(tower_folder), _hidden_size(llm_folder)
    torch.manual_seed(3)
    weights = {"model.mm_projector.0.weight": torch.randn(hidden, mm_hidden) * 0.02,
               "model.mm_projector.0.bias": torch.zeros(hidden),
               "model.mm_projector.2.weight": torch.randn(hidden, hidden) * 0.02,
               "model.mm_projector.2.bias": torch.zeros(hidden)}
    torch.save(weights, path)
    return str(path)


def write_registry(folder) -> str:
    """``datasets.yaml`` (vitacore's form of VITA's config/dataset_config.py) naming each script's --dataset_use,
    each one JSON file of one text record."""
    os.makedirs(folder, exist_ok=True)
    lines = []
    for name in DATASETS:
        with open(os.path.join(folder, f"{name}.json"), "w") as fh:
            json.dump([RECORD], fh)
        lines += [f"{name}:", f"  - chat_path: {name}.json"]
    path = os.path.join(folder, "datasets.yaml")
    with open(path, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    return path


def write_zero3(path) -> str:
    with open(path, "w") as fh:
        json.dump(vita_zero3(), fh, indent=4)
    return str(path)


def script_argv(script: str, paths: dict, run_dir) -> list:
    """``script``'s flags with its paths replaced, then the registry and the dry-run report (no ``--stage``);
    a script whose tower is InternViT (remote code) also gets ``--trust_remote_code True``, the consent
    VITA's own loader gives implicitly."""
    fill = {**paths, "output_dir": os.path.join(str(run_dir), "out")}
    argv = [token.format(**fill) if token.startswith("{") else token for token in SCRIPTS[script]]
    consent = ["--trust_remote_code", "True"] if "{internvit}" in SCRIPTS[script] else []
    return argv + consent + ["--data_registry", paths["registry"], "--dry_run", "True",
                             "--report_json", os.path.join(str(run_dir), "report.json")]
