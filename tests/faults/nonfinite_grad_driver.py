"""Two-rank driver: an infinite gradient on rank 1 alone, at one step, under the DeepSpeed config asked for.

    torchrun --nproc_per_node 2 nonfinite_grad_driver.py OUT_DIR ZERO_STAGE

Trains the tiny model of ``test_numerics`` for 4 steps with ``--skip_nonfinite_steps 1``; on rank 1 a
tensor hook makes one weight's gradient +inf at the 3rd backward (the loss stays finite). Writes
``OUT_DIR/rank<R>.json``: skipped steps, and whether this rank's weights (its ZeRO-3 partition)
stayed equal across step 3, moved at step 4, and are finite at the end.
"""

import json
import os
import pathlib
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]  # test_numerics, and the tests' shared tiny_models
from test_numerics import local_weights, make_trainer, tiny_model  # noqa: E402

from vitacore.engine import init_distributed  # noqa: E402


def main(out_dir: str, zero_stage: int) -> None:
    dist = init_distributed()
    out = pathlib.Path(out_dir)
    model = tiny_model()
    own = out / f"rank{dist.rank}"  # this rank's DeepSpeed file; the run's folder is shared: OUT_DIR/out
    own.mkdir(parents=True, exist_ok=True)
    trainer = make_trainer(dist, own, model, zero_stage, output_dir=out / "out", skip_nonfinite_steps=1)
    calls = []
    if dist.rank == 1:
        model.llm.model.layers[0].mlp.down_proj.weight.register_hook(
            lambda g: calls.append(1) or (torch.full_like(g, float("inf")) if len(calls) == 3 else g))
    seen = {}
    trainer.on_log = lambda row: seen.setdefault(row.get("step"), local_weights(model))
    result = trainer.fit()
    names = list(seen[2])
    report = {"steps": result.num_steps, "skipped": result.num_skipped_steps,
              "unchanged_at_3": all(torch.equal(seen[2][n], seen[3][n]) for n in names),
              "changed_at_4": not all(torch.equal(seen[3][n], seen[4][n]) for n in names),
              "finite": all(bool(torch.isfinite(w).all()) for w in local_weights(model).values())}
    (out / f"rank{dist.rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
