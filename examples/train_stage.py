"""Train one stage of the VITA recipe, or chain stages 1 -> 2 -> 3 -> 4 of the demo.

With no flags this trains stage 1 (the vision projector) of the embedded tiny default model on
bundled synthetic data, in about a minute on a laptop CPU. With VITA's flags
(``--model_name_or_path``, ``--vision_tower``, ...) the same code trains a real model; launch it
with ``torchrun`` or ``deepspeed`` for several processes. Re-running a command resumes from the
newest complete checkpoint in its ``--output_dir``.

    python examples/train_stage.py [--stage 1|2|3|4|neg|fo|all] [--config run.yaml] [VITA flags...]

The run is composed in :mod:`vitacore.recipes.stage` (parse -> stage preset -> typed configs ->
model -> freeze policy -> data -> checkpointer -> Trainer -> fit -> artifacts).
"""

import sys

from vitacore.recipes import recipe_main

if __name__ == "__main__":
    sys.exit(recipe_main(sys.argv[1:]))
