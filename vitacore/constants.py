"""Token ids and labels shared by the data pipeline and the model (VITA's values), and flag choices
shared by the flag parser, the engine and the model."""

IGNORE_INDEX = -100
IMAGE_TOKEN_INDEX = -200
AUDIO_TOKEN_INDEX = -500

DEFAULT_IMAGE_TOKEN = "<image>"
DEFAULT_VIDEO_TOKEN = "<video>"
DEFAULT_AUDIO_TOKEN = "<audio>"

# bitsandbytes' packed weight classes (4-bit, 8-bit), by name so that no caller needs bitsandbytes to import.
QUANTIZED_PARAM_TYPES = ("Params4bit", "Int8Params")

# --zero3_frozen_parts (vitacore.model.zero3_view): the first is the default.
ZERO3_FROZEN_PART_MODES = ("whole", "partitioned")
