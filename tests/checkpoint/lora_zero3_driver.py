"""Run under ``torchrun --nproc_per_node 2``: LoRA artifacts of a ZeRO-3 partitioned model.

Usage: ``lora_zero3_driver.py OUT_DIR PATHS_JSON`` (``{"llm", "tower", "audio"}`` folders). Every rank
builds the same tiny LoRA vita, records its adapter state unpartitioned, lets DeepSpeed partition it,
then saves (all ranks gather, rank 0 writes) and loads ``non_lora_trainables.bin`` back. Then
``build_model`` under ZeRO-3 loads the LLM in 4 and in 8 bits and trains a few steps. Prints
``OK <rank>`` at the end; any failed check raises.
"""

import json
import os
import sys

import deepspeed
import torch
from safetensors.torch import load_file

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tiny_models import TINY, build_tiny_vita  # noqa: E402

from vitacore.checkpoint import (  # noqa: E402
    load_non_lora_trainables,
    lora_state_dict,
    non_lora_trainables,
    save_lora_artifacts,
)
from vitacore.config import parse_args  # noqa: E402
from vitacore.freeze import FreezePolicy, policy_from_config  # noqa: E402
from vitacore.model import UNIT_PREFIXES, LoraSpec, apply_lora  # noqa: E402
from vitacore.recipes import build_model_from_config  # noqa: E402

ZERO3 = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "train_batch_size": 2,
         # Threshold 0: even tiny tensors are partitioned, so a missing gather cannot hide.
         "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}


def lora_vita(spec, llm=None):
    model = build_tiny_vita()
    if llm is not None:
        model.llm = llm
    apply_lora(model, spec, torch.float32)
    FreezePolicy({"llm": "lora", "mm_projector": "full"}, lora_bias=spec.bias).apply(model, UNIT_PREFIXES)
    return model


def engine_for(model, lr):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ZERO3, dist_init_required=False)
    return engine


def check_artifacts(out_dir, rank):
    # --lora_enable True --lora_r 4 --lora_alpha 8 --lora_dropout 0 --lora_bias all
    model = lora_vita(LoraSpec(r=4, alpha=8, dropout=0.0, bias="all"))
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.1 * torch.randn(param.shape, generator=generator))
    want_lora, want_other = lora_state_dict(model, "all"), non_lora_trainables(model, "all")
    engine_for(model, lr=0.0)
    projector = model.mm_projector[0].weight
    assert hasattr(projector, "ds_id") and projector.numel() == 0, "expected partitioned parameters"

    written = save_lora_artifacts(model, out_dir, "all", rank == 0)
    torch.distributed.barrier()
    lora, other = load_file(written["adapter_model.safetensors"]), torch.load(written["non_lora_trainables.bin"])
    assert set(lora) == set(want_lora) and all(torch.equal(lora[k], v) for k, v in want_lora.items())
    assert set(other) == set(want_other) and all(torch.equal(other[k], v) for k, v in want_other.items())

    with deepspeed.zero.GatheredParameters([projector], modifier_rank=0), torch.no_grad():
        projector.zero_()
    load_non_lora_trainables(written["non_lora_trainables.bin"], model)
    with deepspeed.zero.GatheredParameters([projector], modifier_rank=None):
        assert torch.equal(projector.detach().cpu(), want_other["base_model.model.model.mm_projector.0.weight"])


def check_kbit_training(paths, bits):
    """build_model under ZeRO-3 with --bits: the k-bit LLM, LoRA, a partitioned tower; a few steps."""
    config = parse_args(["--model_name_or_path", paths["llm"], "--vision_tower", paths["tower"],
                         "--audio_encoder", paths["audio"], "--bits", str(bits), "--lora_enable", "True",
                         "--lora_r", "4", "--lora_alpha", "8", "--lora_dropout", "0"])
    bundle, config = build_model_from_config(config, deepspeed_config=ZERO3)
    model = bundle.model
    assert any(type(p).__name__ in ("Params4bit", "Int8Params") for p in model.llm.parameters())
    policy_from_config(config).apply(model, UNIT_PREFIXES)
    engine = engine_for(model, lr=1e-2)
    engine.train()
    ids = torch.randint(0, TINY["vocab_size"], (1, 12), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}
    losses = []
    for _ in range(6):
        loss = engine(**batch)["loss"]
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], (bits, losses)
    state = lora_state_dict(model)
    assert state and all(t.numel() > 0 for t in state.values())


def main():
    out_dir, paths = sys.argv[1], json.loads(sys.argv[2])
    deepspeed.init_distributed(dist_backend="gloo")
    rank = torch.distributed.get_rank()
    check_artifacts(out_dir, rank)
    for bits in (4, 8):
        check_kbit_training(paths, bits)
    print(f"OK {rank}", flush=True)


if __name__ == "__main__":
    main()
