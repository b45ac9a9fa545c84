"""Stage runs for ``test_internvit_real.py``, as ``train_stage.py`` runs them, with a dump of the weights.

Run under torchrun (or plain python for one process)::

    internvit_real_driver.py OUT STAGE_FLAGS... [--then STAGE_FLAGS...]

Each flag group is one stage run in this process group, in order (parse -> set up -> fit -> final
artifacts, including the full export where one is due), without the final evaluation. Per run ``i``
every rank writes ``OUT.<i>.rank<R>.json`` (losses, trainable names, whether each tower parameter
was partitioned), and rank 0 writes ``OUT.<i>.pt``: every parameter, gathered, before and after fit.
"""

import json
import sys

import torch

import vitacore
from vitacore.checkpoint import gathered_state


def run(out_path: str, argv: list[str]) -> None:
    recipe = vitacore.StageRecipe(vitacore.parse_args(argv))
    recipe.build_parts()
    recipe.data.eval = None  # the test compares training and the export; no final evaluation
    model, dist = recipe.model, recipe.dist
    partitioned = [hasattr(p, "ds_id") for p in model.vision_tower.parameters()]
    before = gathered_state(model, parameters_only=True)
    result = recipe.build_trainer().fit()
    recipe.cleanup(result)
    after = gathered_state(model, parameters_only=True)
    if dist.is_main:
        torch.save({"before": before, "after": after}, f"{out_path}.pt")
    with open(f"{out_path}.rank{dist.rank}.json", "w") as fh:
        json.dump({"losses": [row["loss"] for row in result.rows if "loss" in row], "steps": result.num_steps,
                   "partitioned": partitioned, "world_size": dist.world_size,
                   "trainable": sorted(n for n, p in model.named_parameters() if p.requires_grad)}, fh)


def main(argv: list[str]) -> None:
    out_path, argv = argv[0], argv[1:]
    groups, current = [], []
    for arg in argv:
        if arg == "--then":
            groups.append(current)
            current = []
        else:
            current.append(arg)
    groups.append(current)
    for index, flags in enumerate(groups):
        run(f"{out_path}.{index}", flags)


if __name__ == "__main__":
    main(sys.argv[1:])
