"""``python -m vitacore.generate OUTPUT_DIR --prompt TEXT [--image PATH ...]``: ask a trained model.

The command is an entry point (``__main__``); its code lives in :mod:`vitacore.recipes.inference`
(``main``, ``load_trained_run``, ``ask``), which only entry points and the package face may import.
"""
