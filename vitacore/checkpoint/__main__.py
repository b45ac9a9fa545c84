"""``python -m vitacore.checkpoint export|merge-lora ...``: an entry point (see :mod:`vitacore.recipes.tools`)."""

import sys

from vitacore.recipes.tools import main

sys.exit(main())
