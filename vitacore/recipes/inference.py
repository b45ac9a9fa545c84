"""Ask a trained model: rebuild a run's model from its output folder (or a checkpoint) and generate.

    python -m vitacore.generate OUTPUT_DIR --prompt TEXT [--image PATH ...] [--audio PATH ...]
        [--video PATH] [--max_new_tokens 64] [--temperature 0] [--seed N] [--trust_remote_code True]

Every run folder and ``checkpoint-<step>`` holds ``config.yaml``, the resolved run config; the model
is rebuilt from it as the run built it (same LLM, tower, audio encoder, template, tiling), one
process, no DeepSpeed, and the trained weights go in, first match wins:

1. a LoRA adapter (``adapter_config.json``): loaded onto the base LLM with PEFT and merged, plus
   ``non_lora_trainables.bin`` (as ``python -m vitacore.checkpoint merge-lora`` does);
2. a full export in the folder itself (``config.json`` + safetensors: a stage that trained the LLM);
3. a checkpoint's DeepSpeed state (the trained parameters, as ``python -m vitacore.checkpoint export``
   reads them);
4. the stage's adapter files (``mm_projector.bin``, ``audio_adpter.bin``).

The question becomes a human turn with its media placeholders, is tokenized exactly as training
tokenizes a record up to its answer (:mod:`vitacore.data.prompts`), and the answer is printed
without the state token the model opens it with.

A tower whose folder holds code (InternViT) needs ``--trust_remote_code True`` on this command:
the value the run recorded in ``config.yaml`` is never taken as consent.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from vitacore.checkpoint import AUDIO_ADAPTER_FILE, MM_PROJECTOR_FILE, is_full_export, load_non_lora_trainables
from vitacore.checkpoint.export.format import AUDIO_SUBFOLDER, VISION_SUBFOLDER
from vitacore.checkpoint.resumable import COMPLETE_MARKER, CONFIG_FILE
from vitacore.config import RunConfig
from vitacore.console import enable_console
from vitacore.data import PromptCollator, PromptDataset, VitaJsonDataset, question_record, records_dataset
from vitacore.demo import SyntheticSelection
from vitacore.engine.evaluation import GenerationEval
from vitacore.model import VitaModel
from vitacore.recipes.model import build_model_from_config, model_inputs
from vitacore.recipes.specs import data_spec
from vitacore.recipes.tools import ADAPTER_CONFIG, _run_config, rebuild_from_checkpoint, yes_no

PROG = "python -m vitacore.generate"
# Tokens generated beyond the longest reference answer in --eval_generate (an answer that long is wrong anyway).
EVAL_ANSWER_MARGIN = 8


@dataclass
class TrainedRun:
    """A run's model rebuilt for inference.

    Attributes:
        model: the model, in eval mode, with the trained weights.
        tokenizer: its tokenizer.
        config: the run's config (model type and template resolved).
        folder: the folder it was loaded from.
        weights: where the trained weights came from, in words.
    """

    model: VitaModel
    tokenizer: object
    config: RunConfig
    folder: str
    weights: str


def _build(config: RunConfig, folder: str) -> tuple:
    """The model ``config`` describes, after checking the folders it names exist here."""
    m = config.model
    for flag, path in (("--model_name_or_path", m.model_name_or_path), ("--vision_tower", m.vision_tower),
                       ("--audio_encoder", m.audio_encoder), ("--system_prompts", config.data.system_prompts)):
        if path and not os.path.exists(path):
            raise FileNotFoundError(
                f"{PROG} {folder!r}: its {CONFIG_FILE} has {flag} {path!r}, which is not on this machine (a relative "
                f"path is relative to the folder the run started in: run this command from there)")
    return build_model_from_config(config)


def _no_start_files(config: RunConfig) -> None:
    # The trained values come from the folder; the files the run started from may be long gone.
    config.model.pretrain_mm_mlp_adapter = config.model.pretrain_audio_mlp_adapter = None
    config.training.lora_weight_path = None


def _load_lora(folder: str, trust_remote_code: bool) -> tuple:
    from peft import PeftModel  # seconds to import: LoRA folders only

    config = _run_config(folder, PROG, lora=False, trust_remote_code=trust_remote_code)
    non_lora = os.path.join(folder, "non_lora_trainables.bin")
    if os.path.exists(non_lora):
        _no_start_files(config)
    bundle, config = _build(config, folder)
    with warnings.catch_warnings():  # a transformers deprecation note peft triggers, not the user's business
        warnings.simplefilter("ignore", FutureWarning)
        bundle.model.llm = PeftModel.from_pretrained(bundle.model.llm, folder).merge_and_unload()
    if os.path.exists(non_lora):
        load_non_lora_trainables(non_lora, bundle.model, origin=f"{PROG} {folder!r}")
    return bundle, config, "its LoRA adapter merged into the base LLM" + (
        " and non_lora_trainables.bin" if os.path.exists(non_lora) else "")


def _load_export(folder: str, trust_remote_code: bool) -> tuple:
    config = _run_config(folder, PROG, lora=False, trust_remote_code=trust_remote_code)
    _no_start_files(config)
    m = config.model
    m.model_name_or_path = os.path.abspath(folder)
    if os.path.isdir(os.path.join(folder, VISION_SUBFOLDER)):
        m.vision_tower = None  # the export's own copy of the tower's config
    if os.path.isdir(os.path.join(folder, AUDIO_SUBFOLDER)):
        m.audio_encoder = None
    bundle, config = _build(config, folder)
    return bundle, config, "its full export"


def _load_checkpoint_state(folder: str, trust_remote_code: bool) -> tuple:
    bundle, config, count = rebuild_from_checkpoint(folder, PROG, build=lambda config: _build(config, folder),
                                                    trust_remote_code=trust_remote_code)
    return bundle, config, f"the {count} trained tensors of its DeepSpeed state"


def _load_adapters(folder: str, trust_remote_code: bool) -> tuple:
    files = {name: os.path.join(folder, name) for name in (MM_PROJECTOR_FILE, AUDIO_ADAPTER_FILE)}
    present = {name: path for name, path in files.items() if os.path.exists(path)}
    if not present:
        checkpoints = sorted(n for n in os.listdir(folder) if n.startswith("checkpoint-"))
        hint = f"; pass one of its checkpoints ({', '.join(checkpoints[-3:])})" if checkpoints else ""
        raise FileNotFoundError(
            f"{PROG} {folder!r}: no trained weights there: none of {MM_PROJECTOR_FILE}, {AUDIO_ADAPTER_FILE}, "
            f"{ADAPTER_CONFIG} (LoRA), a full export (config.json + model.safetensors) or a DeepSpeed state "
            f"(a checkpoint-<step> folder){hint}")
    config = _run_config(folder, PROG, trust_remote_code=trust_remote_code)
    _no_start_files(config)
    if MM_PROJECTOR_FILE in present:
        config.model.pretrain_mm_mlp_adapter = present[MM_PROJECTOR_FILE]
    if AUDIO_ADAPTER_FILE in present:
        config.model.pretrain_audio_mlp_adapter = present[AUDIO_ADAPTER_FILE]
    bundle, config = _build(config, folder)
    return bundle, config, " and ".join(sorted(present))


def load_trained_run(folder: str, trust_remote_code: bool = False) -> TrainedRun:
    """The model a run trained, rebuilt from ``folder`` (its ``--output_dir`` or a ``checkpoint-<step>``).

    Args:
        folder: the run's output folder or checkpoint.
        trust_remote_code: allow running a tower folder's Python files (InternViT); the value in the
            folder's config.yaml is not used.

    Raises:
        FileNotFoundError: no such folder, no ``config.yaml`` in it, or no trained weights (naming the folder).
        ValueError: weights that do not fit the model its config describes.
    """
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{PROG} {folder!r}: no such folder (give a run's --output_dir or one of its "
                                "checkpoint-<step> folders)")
    if not os.path.exists(os.path.join(folder, CONFIG_FILE)):
        raise FileNotFoundError(f"{PROG} {folder!r}: no {CONFIG_FILE} there, so the run cannot be rebuilt (give a "
                                "vitacore run's --output_dir or one of its checkpoint-<step> folders)")
    if os.path.exists(os.path.join(folder, ADAPTER_CONFIG)):
        bundle, config, weights = _load_lora(folder, trust_remote_code)
    elif is_full_export(folder):
        bundle, config, weights = _load_export(folder, trust_remote_code)
    elif os.path.exists(os.path.join(folder, COMPLETE_MARKER)):
        bundle, config, weights = _load_checkpoint_state(folder, trust_remote_code)
    else:
        bundle, config, weights = _load_adapters(folder, trust_remote_code)
    bundle.model.eval()
    return TrainedRun(bundle.model, bundle.tokenizer, config, folder, weights)


def prompt_dataset(run: TrainedRun, records: list[dict], media_root: str = ".") -> PromptDataset:
    """Prompts of ``records`` built with the run's template, image pipeline and audio features."""
    spec = data_spec(run.config, None, SyntheticSelection())
    return records_dataset(records, spec, run.tokenizer, model_inputs(run.model), media_root=media_root)


def ask(run: TrainedRun, prompt: str, images: Sequence[str] = (), audios: Sequence[str] = (),
        video: Optional[str] = None, max_new_tokens: int = 64, temperature: float = 0.0) -> str:
    """The model's answer to ``prompt`` about the media files (greedy unless ``temperature`` > 0).

    Raises:
        ValueError / FileNotFoundError: media the model has no encoder for, or a missing / unreadable file.
    """
    if (images or video) and run.model.vision_tower is None:
        raise ValueError(f"--image / --video: the model of {run.folder!r} has no vision tower")
    if audios and run.model.audio_encoder is None:
        raise ValueError(f"--audio: the model of {run.folder!r} has no audio encoder")
    prompts = prompt_dataset(run, [question_record(prompt, images, audios, video)])
    batch = PromptCollator(run.tokenizer.pad_token_id)([prompts[0]])
    batch.pop("references")
    answers = run.model.generate(**batch, max_new_tokens=max_new_tokens, temperature=temperature,
                                 eos_token_id=prompts.stop_token_ids, pad_token_id=run.tokenizer.pad_token_id)
    return prompts.answer_text(answers[0])


def eval_generation(eval_set: VitaJsonDataset) -> GenerationEval:
    """``--eval_generate``: the eval set's prompts, and how answers are generated and read back."""
    prompts = PromptDataset(eval_set)
    return GenerationEval(prompts, PromptCollator(eval_set.tokenizer.pad_token_id), prompts.answer_text,
                          max_new_tokens=prompts.max_answer_tokens() + EVAL_ANSWER_MARGIN,
                          eos_token_id=prompts.stop_token_ids, pad_token_id=eval_set.tokenizer.pad_token_id)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m vitacore.generate``: print the trained model's answer; the exit code (2 on a bad folder or file)."""
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", help="a run's --output_dir, or a checkpoint-<step> folder in it")
    parser.add_argument("--prompt", required=True, help="the question (media placeholders are added in front)")
    parser.add_argument("--image", action="append", default=[], help="an image file (repeat for several)")
    parser.add_argument("--audio", action="append", default=[], help="an audio file (repeat for several)")
    parser.add_argument("--video", help="a video file")
    parser.add_argument("--max_new_tokens", type=int, default=64, help="the most tokens generated")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy; above 0: sample")
    parser.add_argument("--seed", type=int, default=None, help="seeds sampling (with --temperature > 0)")
    parser.add_argument("--trust_remote_code", type=yes_no, default=False, metavar="True|False",
                        help="allow running the Python files of a tower folder whose config.json has an auto_map "
                             "(InternViT); only for folders you trust (config.yaml's value is not used)")
    args = parser.parse_args(argv)
    if args.max_new_tokens < 1 or args.temperature < 0:
        parser.error("--max_new_tokens must be >= 1 and --temperature >= 0")
    enable_console(logging.WARNING)  # warnings only: stdout is the answer
    try:
        run = load_trained_run(args.folder, args.trust_remote_code)
        if args.seed is not None:
            torch.manual_seed(args.seed)
        answer = ask(run, args.prompt, args.image, args.audio, args.video, args.max_new_tokens, args.temperature)
    except (OSError, ValueError) as err:  # a missing or unreadable folder or file, weights that do not fit
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"({run.folder}: {run.weights})", file=sys.stderr)
    print(answer)
    return 0
