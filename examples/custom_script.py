"""Your own model and dataset on vitacore's engine: a frozen encoder and a trained head.

No VITA flag parser here: the script has its own few flags and builds the Trainer's typed parts.

    python examples/custom_script.py --output_dir out [--max_steps 60 ...]
    torchrun --nproc_per_node 2 examples/custom_script.py --deepspeed configs/zero3.json --output_dir out
"""

import argparse
import hashlib
import json
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

import vitacore
from vitacore.checkpoint import atomic_torch_save, gathered_state

DIM, WIDTH, CLASSES = 16, 64, 16
UNITS = {"encoder": ("encoder.",), "head": ("head.",)}  # this model's freeze units: name prefixes
POLICY = vitacore.FreezePolicy({"encoder": "frozen", "head": "full"})


class Classifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(DIM, WIDTH), nn.GELU(), nn.Linear(WIDTH, WIDTH), nn.GELU())
        self.head = nn.Linear(WIDTH, CLASSES)

    def forward(self, features, labels):
        logits = self.head(self.encoder(features))
        return {"loss": F.cross_entropy(logits, labels), "logits": logits}


def points(size, seed):
    """A map-style dataset: Gaussian points labelled by a fixed random linear "teacher"."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(size, DIM, generator=gen)
    return torch.utils.data.TensorDataset(x, (x @ torch.randn(DIM, CLASSES, generator=gen)).argmax(-1))


def collate(items):
    return {"features": torch.stack([x for x, _ in items]), "labels": torch.stack([y for _, y in items])}


def build_model(seed):  # the same initial weights on every rank and for a given seed
    torch.manual_seed(seed)
    return Classifier()


def digest(module):  # every rank must call it: gathering is a collective under ZeRO-3
    return hashlib.sha256(b"".join(t.numpy().tobytes() for t in gathered_state(module).values())).hexdigest()


def parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--max_steps", type=int, default=80)
    parser.add_argument("--learning_rate", type=float, default=5e-2)
    parser.add_argument("--per_device_train_batch_size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--deepspeed", default=None, help="a DeepSpeed JSON config (default: ZeRO-0 / ZeRO-2)")
    return parser.parse_args(argv)


def main(argv):
    args = parse(argv)
    vitacore.enable_console()
    dist = vitacore.init_distributed()
    say = print if dist.is_main else (lambda *a: None)
    loop = vitacore.LoopConfig(max_steps=args.max_steps, per_device_train_batch_size=args.per_device_train_batch_size,
                               logging_steps=1, seed=args.seed)
    optim = vitacore.OptimConfig(learning_rate=args.learning_rate)
    ds_config, notes = vitacore.resolve_deepspeed_config(args.deepspeed, loop=loop, optim=optim,
                                                         world_size=dist.world_size, hidden_size=WIDTH)
    for note in notes:
        say(f"note: {note}")
    model = build_model(args.seed)
    POLICY.apply(model, UNITS)
    groups = vitacore.build_param_groups(model, UNITS, optim.learning_rate, optim.weight_decay)
    say(vitacore.format_report(vitacore.build_report(model, UNITS, POLICY, groups)))
    frozen_before = digest(model.encoder)
    checkpointer = vitacore.Checkpointer(vitacore.CheckpointConfig(args.output_dir), dist)
    result = vitacore.Trainer(model, groups, points(1024, args.seed), collate, dist, loop=loop, optim=optim,
                              deepspeed_config=ds_config, checkpointer=checkpointer).fit()
    say(f"{result.num_steps} steps on {dist.world_size} process(es): "
        f"loss {result.first_loss:.4f} -> {result.last_loss:.4f}")
    head, frozen_after = gathered_state(model.head, "head."), digest(model.encoder)
    if dist.is_main:
        atomic_torch_save(head, os.path.join(args.output_dir, "head.bin"))
        with open(os.path.join(args.output_dir, "frozen_encoder.json"), "w") as fh:
            json.dump({"before": frozen_before, "after": frozen_after}, fh)


if __name__ == "__main__":
    main(sys.argv[1:])
