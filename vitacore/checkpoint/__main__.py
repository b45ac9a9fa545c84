"""``python -m vitacore.checkpoint export|merge-lora ...`` (see :mod:`vitacore.checkpoint.tools`)."""

import sys

from vitacore.checkpoint.tools import main

sys.exit(main())
