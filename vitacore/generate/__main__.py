"""``python -m vitacore.generate ...``: an entry point (see :mod:`vitacore.recipes.inference`)."""

import sys

from vitacore.recipes.inference import main

sys.exit(main())
