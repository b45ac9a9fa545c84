"""Your own model and dataset on vitacore's engine: a frozen encoder and a trained head.

    python examples/custom_script.py --output_dir out [--max_steps 60 ...]
    torchrun --nproc_per_node 2 examples/custom_script.py --deepspeed configs/zero3.json --output_dir out
"""

import hashlib, json, os, sys

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


def main(argv):
    # Defaults for this task first; the user's flags come later and win.
    config = vitacore.parse_args(["--learning_rate", "5e-2", "--logging_steps", "1", "--max_steps", "80",
                                  "--per_device_train_batch_size", "16", *argv])
    args, dist = config.training, vitacore.init_distributed()
    say = print if dist.is_main else (lambda *a: None)
    ds_config, notes = vitacore.resolve_deepspeed_config(args, dist.world_size, hidden_size=WIDTH)
    for note in notes:
        say(f"note: {note}")
    model = build_model(args.seed)
    POLICY.apply(model, UNITS)
    groups = vitacore.build_param_groups(model, UNITS, args.learning_rate, args.weight_decay)
    say(vitacore.format_report(vitacore.build_report(model, UNITS, POLICY, groups)))
    frozen_before = digest(model.encoder)
    result = vitacore.Trainer(config, model, groups, points(1024, args.seed), collate, dist,
                              deepspeed_config=ds_config).fit()
    say(f"{result.num_steps} steps on {dist.world_size} process(es): "
        f"loss {result.first_loss:.4f} -> {result.last_loss:.4f}")
    head, frozen_after = gathered_state(model.head, "head."), digest(model.encoder)
    if dist.is_main:
        atomic_torch_save(head, os.path.join(args.output_dir, "head.bin"))
        with open(os.path.join(args.output_dir, "frozen_encoder.json"), "w") as fh:
            json.dump({"before": frozen_before, "after": frozen_after}, fh)


if __name__ == "__main__":
    main(sys.argv[1:])
