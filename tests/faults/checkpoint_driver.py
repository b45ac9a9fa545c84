"""A tiny model under a real DeepSpeed engine, saved and resumed through the real Checkpointer.

Imported by the checkpoint fault tests (one process), and run under torchrun for the multi-process ones:

    checkpoint_driver.py save OUT_DIR STEP     # train a step, write checkpoint-STEP (ZeRO-3)
    checkpoint_driver.py resume OUT_DIR        # restore the newest checkpoint
    checkpoint_driver.py truncated OUT_DIR     # save checkpoint-4, cut rank 1's optimizer shard, resume

``truncated`` prints ``{"size": ..., "expected": ...}`` of the cut file; ``resume`` and ``truncated``
print ``rank R resumed step S`` or ``rank R refused after T s: MESSAGE`` (exit 3), where
T is measured from entering ``Checkpointer.load`` to the refusal.
"""

import json
import os
import sys
import time

import torch
import torch.nn as nn

IDENTITY = {"world_size": 1, "llm": "tiny", "vision_tower": None, "audio_encoder": None, "mm_projector_type": None,
            "trainable": {"a.weight": [8, 8]}, "batch": [1, 1], "seed": 0}


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 1)

    def forward(self, x):
        return self.b(torch.relu(self.a(x))).pow(2).mean()


def engine_for(zero_stage: int = 0, seed: int = 0):
    """A DeepSpeed engine over :class:`Tiny` (torch AdamW; ZeRO-3 partitions even tiny tensors)."""
    import deepspeed

    torch.manual_seed(seed)
    model = Tiny()
    config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "steps_per_print": 10**9,
              "zero_allow_untested_optimizer": True,
              "zero_optimization": {"stage": zero_stage, "stage3_param_persistence_threshold": 0}}
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-2),
                                      config=config, dist_init_required=False)
    return engine


def train_step(engine) -> None:
    loss = engine(torch.randn(2, 8))
    engine.backward(loss)
    engine.step()


def identity(world_size: int) -> dict:
    return {**IDENTITY, "world_size": world_size}


def save(checkpointer, engine, step: int, **extra) -> str:
    """``Checkpointer.save`` with the loop state the trainer writes (position and identity)."""
    state = {"position": {"step": step, "epoch": 0, "micro_in_epoch": step}, "identity": identity(
        checkpointer.dist.world_size), **extra}
    return checkpointer.save(engine, step, state)


def main(argv):
    from vitacore.checkpoint import CheckpointConfig, Checkpointer
    from vitacore.engine import init_distributed

    mode, out = argv[0], argv[1]
    dist = init_distributed(timeout_s=120)
    engine = engine_for(zero_stage=3)
    checkpointer = Checkpointer(CheckpointConfig(out), dist)
    if mode in ("save", "truncated"):
        train_step(engine)
        save(checkpointer, engine, int(argv[2]) if mode == "save" else 4)
        print(f"rank {dist.rank} saved", flush=True)
        if mode == "save":
            return 0
        checkpointer.close()
        if dist.is_main:
            shard = os.path.join(out, "checkpoint-4", "state", "zero_pp_rank_1_mp_rank_00_optim_states.pt")
            size = os.path.getsize(shard)
            os.truncate(shard, size // 2)
            print(json.dumps({"size": size // 2, "expected": size}), flush=True)
        torch.distributed.barrier()
        checkpointer = Checkpointer(CheckpointConfig(out), dist)
    started = time.time()
    try:
        state = checkpointer.load(engine, identity(dist.world_size))
    except ValueError as err:
        print(f"rank {dist.rank} refused after {time.time() - started:.1f} s: {err}", flush=True)
        return 3
    print(f"rank {dist.rank} resumed step {state['step']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
