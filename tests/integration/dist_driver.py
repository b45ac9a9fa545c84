"""A driver for the multi-process tests: trains through the public API, then dumps what ranks saw.

Run under torchrun (or plain python for one process):
    dist_driver.py OUT_JSON [--alternate_modalities] [--dump_changes] [train_stage.py flags...]
Writes OUT_JSON.rank<R>: the logged losses, and for ZeRO-3 the local shard sizes of the parameters and the
parts the engine holds out of ZeRO-3 (frozen encoders and adapters, kept whole).
With ``--dump_changes``: the names of the parameters whose gathered values changed, and (rank 0)
``OUT_JSON.trained.pt`` with the final values of the trainable ones.
"""

import dataclasses
import json
import sys

import torch
from torch.utils.data import DataLoader

import vitacore
from vitacore.checkpoint import gathered_state
from vitacore.data.dataset import VitaJsonDataset
from vitacore.data.sampler import ResumableSampler
from vitacore.recipes import model_inputs


class AlternatingModalities(torch.utils.data.Dataset):
    """Item i carries an image when i % 4 is 0 or 3, else text only: with batch 1 and no shuffling,
    rank 0 sees image, text, image, ... and rank 1 text, image, text, ... (never the same at once)."""

    def __init__(self, base: VitaJsonDataset, texts: VitaJsonDataset, length: int):
        self.base, self.texts, self.length = base, texts, length

    def __len__(self):
        return self.length

    def __getitem__(self, index):
        return self.base[index] if index % 4 in (0, 3) else self.texts[index]


def main(argv):
    out_path, argv = argv[0], argv[1:]
    alternate = "--alternate_modalities" in argv
    dump_changes = "--dump_changes" in argv
    argv = [a for a in argv if a not in ("--alternate_modalities", "--dump_changes")]
    recipe = vitacore.StageRecipe(vitacore.parse_args(argv))
    recipe.build_parts()
    dist, model, loop = recipe.dist, recipe.model, recipe.specs.loop
    recipe.data.eval = None  # the losses of training are what is compared; no final evaluation
    train = recipe.data.train
    if alternate:
        texts = dataclasses.replace(recipe.specs.data, bundled=dataclasses.replace(
            recipe.specs.data.bundled, train=(recipe.assets.subset("text"),)))
        text_set = vitacore.build_data(texts, recipe.bundle.tokenizer, model_inputs(model)).train
        train = AlternatingModalities(recipe.data.train, text_set, 4 * dist.world_size * loop.max_steps)
    trainer = recipe.build_trainer(train)
    if alternate:  # fixed order, so the modality pattern per rank is the one described above
        trainer.sampler = ResumableSampler(train, dist.world_size, dist.rank, seed=loop.seed, shuffle=False)
        trainer.loader = DataLoader(train, batch_size=loop.per_device_train_batch_size, sampler=trainer.sampler,
                                    collate_fn=recipe.data.collator, generator=trainer.loader_generator)
    shards = {name: int(p.ds_tensor.numel()) for name, p in model.named_parameters() if hasattr(p, "ds_tensor")}
    full = {name: int(p.ds_numel) for name, p in model.named_parameters() if hasattr(p, "ds_numel")}
    local = {name: int(p.numel()) for name, p in model.named_parameters()}
    before = gathered_state(model) if dump_changes else {}
    result = trainer.fit()
    recipe.checkpointer.artifacts.write(recipe.checkpointer.output_dir, dist.is_main)
    changed = []
    if dump_changes:
        after = gathered_state(model)
        changed = sorted(name for name in after if not torch.equal(before[name], after[name]))
        if dist.is_main:
            trainable = {n for n, p in model.named_parameters() if p.requires_grad}
            torch.save({n: after[n] for n in trainable}, f"{out_path}.trained.pt")
    losses = [row["loss"] for row in result.rows if "loss" in row]
    with open(f"{out_path}.rank{dist.rank}", "w") as fh:
        json.dump({"losses": losses, "shards": shards, "full": full, "local": local, "steps": result.num_steps,
                   "world_size": dist.world_size, "stopped_by": result.stopped_by, "changed": changed,
                   "sampler": type(trainer.sampler).__name__,
                   "held_out": list(getattr(trainer.engine.module, "held_out", ())),
                   "trainable": sorted(n for n, p in model.named_parameters() if p.requires_grad)}, fh)


if __name__ == "__main__":
    main(sys.argv[1:])
