"""Train one stage of the VITA recipe, or chain stages 1 -> 2 -> 3 -> 4 of the demo.

With no flags this trains stage 1 (the vision projector) of the embedded tiny default model on
bundled synthetic data, in about a minute on a laptop CPU. With VITA's flags
(``--model_name_or_path``, ``--vision_tower``, ...) the same code trains a real model; launch it
with ``torchrun`` or ``deepspeed`` for several processes. Re-running a command resumes from the
newest complete checkpoint in its ``--output_dir``.

    python examples/train_stage.py [--stage 1|2|3|4|neg|fo|all] [--config run.yaml] [VITA flags...]
"""

from __future__ import annotations

import copy
import json
import os
import sys
import time

import vitacore


CHAINED_STAGES = ("1", "2", "3", "4")


def main(argv=None) -> int:
    try:
        config = vitacore.parse_args(argv)
        if config.stage == "all":
            return train_all(config)
        return train(config)
    except (ValueError, FileNotFoundError, vitacore.NonFiniteLossError) as err:
        # Bad flags, files or data, or a diverged loss: say what and where, without a traceback.
        print(f"error: {err}", file=sys.stderr)
        return 2


def train_all(config) -> int:
    """Stages 1 -> 2 -> 3 -> 4 on the embedded default, each from the previous stages' artifacts.

    Stage ``k`` writes to ``output/demo-stage-k`` (or ``<--output_dir>/stage-k``).
    """
    if not vitacore.uses_embedded_default(config):
        raise ValueError("--stage all chains the demo stages of the embedded default model; with your own "
                         "--model_name_or_path / --vision_tower / --audio_encoder run each --stage in turn")
    pattern = None
    if config.is_explicit("output_dir"):
        pattern = os.path.join(config.training.output_dir, "stage-{stage}")
        config.set("output_dir", None)
    for key in CHAINED_STAGES:
        stage_config = copy.deepcopy(config)
        stage_config.stage = key
        train(stage_config, demo_output=pattern)
    return 0


def train(config, demo_output=None) -> int:
    started = time.time()
    embedded = vitacore.uses_embedded_default(config)
    stage = vitacore.apply_stage(config, embedded_default=embedded, demo_output=demo_output)
    vitacore.validate(config)
    args = config.training

    dist = vitacore.init_distributed()
    say = print if dist.is_main else (lambda *a, **k: None)
    say(f"vitacore: stage {stage.key} ({stage.name}: trains {stage.trains}), "
        f"{dist.world_size} process(es) on {dist.device.type}"
        + (", embedded default model and data" if embedded else ""))

    for note in vitacore.stage_notes(config, stage):
        say(f"note: {note}")

    ds_config, ds_notes = vitacore.resolve_deepspeed_config(args, dist.world_size,
                                                            vitacore.llm_hidden_size(config, log=say))
    bundle = vitacore.build_model(config, log=say, deepspeed_config=ds_config)
    policy = vitacore.policy_from_config(config)
    policy.apply(bundle.model, vitacore.UNIT_PREFIXES)
    groups = vitacore.param_groups_for_run(bundle.model, vitacore.UNIT_PREFIXES, args)
    report = vitacore.build_report(bundle.model, vitacore.UNIT_PREFIXES, policy, groups)
    say(vitacore.describe_sources(config))
    say(vitacore.format_report(report))
    if config.report_json and dist.is_main:
        with open(config.report_json, "w") as fh:
            json.dump(report, fh, indent=2)
    if config.dry_run:
        say("dry run: nothing trained")
        return 0

    data = vitacore.build_data(config, bundle, stage.demo_data)
    trained = set(policy.trained_units())

    def save_artifacts(directory, final=False):
        return vitacore.save_run_artifacts(bundle.model, directory, trained, dist.is_main, tokenizer=bundle.tokenizer,
                                           lora_bias=args.lora_bias, full_export=final)

    trainer = vitacore.Trainer(config, bundle.model, groups, data.train, data.collator, dist,
                               eval_dataset=data.eval, deepspeed_config=ds_config, save_artifacts=save_artifacts)
    for note in ds_notes + trainer.notes:
        say(f"note: {note}")
    result = trainer.fit()
    artifacts = save_artifacts(args.output_dir, final=True)
    if dist.is_main:  # the resolved run config beside the artifacts (merge-lora and export rebuild from it)
        config.to_yaml(os.path.join(args.output_dir, "config.yaml"))

    if result.stopped_by:
        say(f"\nstopped by {result.stopped_by} after step {result.num_steps}; artifacts saved")
    say(f"\ndone: {result.num_steps} steps in {result.seconds:.1f}s (total {time.time() - started:.1f}s)")
    if result.first_loss is not None:
        say(f"loss {result.first_loss:.4f} -> {result.last_loss:.4f}")
    if result.final_eval:
        ev = result.final_eval
        say(f"eval: loss {ev['eval_loss']:.4f}, answer-token accuracy {ev['eval_accuracy']:.3f}, "
            f"exact answers {ev['eval_exact_match']:.3f} ({ev['eval_samples']} held-out samples)")
    checkpoint = vitacore.latest_checkpoint(args.output_dir)
    for name, path in {**artifacts, "metrics.jsonl": os.path.join(args.output_dir, "metrics.jsonl"),
                       "checkpoint": checkpoint}.items():
        if dist.is_main and path and os.path.exists(path):
            say(f"wrote {path} ({_size(path):,} bytes)")
    return 0


def _size(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files)


if __name__ == "__main__":
    sys.exit(main())
