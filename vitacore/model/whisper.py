"""Whisper's encoder as vitacore's audio encoder (the decoder of the checkpoint is not loaded).

Same interface as :class:`vitacore.model.audio.AudioEncoder`: ``hidden_size``, ``num_mel_bins``,
``source``, and ``forward(features, lengths) -> (states, out_lengths)`` on ``(B, frames, mel)``
features.

Cost: transformers' Whisper encoder only accepts its full window (30 s, 3000 frames, 1500 states)
and has no attention mask, so every clip is padded to the window and the encoder always does a full
30 s pass; a 3 s clip costs as much encoder compute as a 30 s one. Only the states of the clip's
own frames are returned (so the adapter and the LLM see the clip's length), but the encoder pass
itself does not shrink. VITA's own encoder takes variable lengths; the tiny default does too. The
dummy pass that keeps ranks in step (:mod:`vitacore.model.encoder_sync`) runs the blocks on one state.
"""

from __future__ import annotations

import json
import os

import torch
import torch.nn as nn

from vitacore.console import logger
from vitacore.data.whisper_audio import whisper_silence_value
from vitacore.model.families import attention_implementation
from vitacore.model.loading import quiet_load_report

CONFIG_FILE = "config.json"
FEATURE_EXTRACTOR_FILE = "preprocessor_config.json"
# The encoder's keys in a WhisperForConditionalGeneration / WhisperModel checkpoint.
_ENCODER_KEYS = {r"^model\.encoder\.": "", r"^encoder\.": ""}


def is_whisper_folder(path: str) -> bool:
    """True when ``path`` has a transformers config.json with model_type ``whisper``."""
    config_file = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(config_file):
        return False
    with open(config_file) as fh:
        return json.load(fh).get("model_type") == "whisper"


class WhisperAudioEncoder(nn.Module):
    """A transformers ``WhisperEncoder`` behind vitacore's audio-encoder interface.

    Args:
        encoder: the ``WhisperEncoder``.
        feature_extractor: the checkpoint's ``WhisperFeatureExtractor`` (the data pipeline's features).
        source: where the encoder came from (reported, and saved in exports).
    """

    def __init__(self, encoder: nn.Module, feature_extractor, source: str):
        super().__init__()
        self.encoder = encoder
        self.feature_extractor = feature_extractor
        self.source = source
        window = encoder.config.max_source_positions * encoder.conv1.stride[0] * encoder.conv2.stride[0]
        if feature_extractor.nb_max_frames != window:
            raise ValueError(f"--audio_encoder {source!r}: {FEATURE_EXTRACTOR_FILE} makes "
                             f"{feature_extractor.nb_max_frames} frames per clip but the encoder reads exactly "
                             f"{window} (max_source_positions {encoder.config.max_source_positions}); use the "
                             "feature extractor of this checkpoint")
        if feature_extractor.feature_size != encoder.config.num_mel_bins:
            raise ValueError(f"--audio_encoder {source!r}: {FEATURE_EXTRACTOR_FILE} has "
                             f"{feature_extractor.feature_size} mel bins but the encoder reads "
                             f"{encoder.config.num_mel_bins}")
        self.window_frames = window

    @property
    def config(self):
        """The checkpoint's ``WhisperConfig``."""
        return self.encoder.config

    @property
    def hidden_size(self) -> int:
        return self.encoder.config.d_model

    @property
    def num_mel_bins(self) -> int:
        return self.encoder.config.num_mel_bins

    @property
    def fewest_frames(self) -> int:
        """Frames of a dummy clip (:mod:`vitacore.model.encoder_sync`): one state's worth (the rate halves)."""
        return 2

    def fewest_token_cuts(self) -> list[tuple[nn.Module, int, int]]:
        """``(module, dim, length)``: a dummy pass cuts the first convolution's output to :attr:`fewest_frames`
        and the position embeddings to one state, so the blocks run on one state, not the window's (1500 for 30 s)."""
        # (B, d, frames) out of the convolution; (states, d) out of the position embeddings
        return [(self.encoder.conv1, -1, self.fewest_frames), (self.encoder.embed_positions, -2, 1)]

    def forward(self, features: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode ``(B, T, mel)`` features (``T`` <= the window); return the clips' states and their lengths.

        Each clip is padded to the window with Whisper's silence value for that clip (exactly what
        its feature extractor wrote there), the encoder runs on the whole window, and the states
        are cut to the longest clip: ``ceil(length / 2)`` states per clip.

        Raises:
            ValueError: features longer than the encoder's window.
        """
        batch, frames, mel = features.shape
        if frames > self.window_frames:
            raise ValueError(f"Whisper encoder {self.source!r}: {frames} feature frames, but its window is "
                             f"{self.window_frames}; clips must be at most {self.feature_extractor.chunk_length} s")
        dtype = self.encoder.conv1.weight.dtype
        valid = (torch.arange(frames, device=features.device)[None, :] < lengths[:, None])[..., None]
        silence = whisper_silence_value(features.masked_fill(~valid, float("-inf")))[:, None, None]
        padded = silence.expand(batch, self.window_frames, mel).clone()
        padded[:, :frames] = torch.where(valid, features, silence)
        states = self.encoder(padded.to(dtype).transpose(1, 2)).last_hidden_state
        out_lengths = (lengths + 1) // 2
        return states[:, : int(out_lengths.max())], out_lengths

    def save_config(self, directory: str) -> None:
        """Write the encoder's config and feature extractor (no weights) to ``directory``."""
        self.encoder.config.save_pretrained(directory)
        self.feature_extractor.save_pretrained(directory)


def _feature_extractor(path: str, flag: str):
    from transformers import WhisperFeatureExtractor  # Whisper's modules take seconds: Whisper runs only

    if not os.path.isfile(os.path.join(path, FEATURE_EXTRACTOR_FILE)):
        raise FileNotFoundError(f"{flag} {path!r}: a Whisper checkpoint, but no {FEATURE_EXTRACTOR_FILE} there; copy "
                                "the checkpoint's feature extractor config beside its config.json")
    return WhisperFeatureExtractor.from_pretrained(path)


def _say_cost(extractor) -> None:
    window = extractor.chunk_length
    logger.info(f"vitacore: note: the Whisper encoder pads every clip to its {window} s window "
                f"({extractor.nb_max_frames} frames), so each clip costs a full {window} s encoder pass however "
                "short it is; only the clip's own states go on to the adapter and the LLM")


def load_whisper_encoder(path: str, dtype: torch.dtype) -> WhisperAudioEncoder:
    """Whisper's encoder with its weights from the checkpoint in ``path`` (the decoder is skipped).

    Raises:
        FileNotFoundError: no feature extractor config in ``path``.
        ValueError: the checkpoint lacks encoder weights.
    """
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    extractor = _feature_extractor(path, "--audio_encoder")
    attention = attention_implementation(dtype, what="the Whisper encoder")
    with quiet_load_report():  # it lists the decoder's keys, which are not wanted here
        encoder, info = WhisperEncoder.from_pretrained(path, key_mapping=_ENCODER_KEYS, dtype=dtype,
                                                       attn_implementation=attention, output_loading_info=True)
    missing = sorted(info.get("missing_keys", ()))
    if missing:
        raise ValueError(f"--audio_encoder {path!r}: the checkpoint has no weights for these encoder tensors: "
                         f"{missing}")
    logger.info(f"vitacore: audio encoder: Whisper's encoder from {path!r} (decoder not loaded)")
    _say_cost(extractor)
    return WhisperAudioEncoder(encoder.eval(), extractor, source=os.path.abspath(path))


def build_whisper_encoder(path: str, dtype: torch.dtype, source: str) -> WhisperAudioEncoder:
    """A Whisper encoder of the architecture in ``path``'s config, weights not loaded (an export's shards hold them)."""
    from transformers import WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    config = WhisperConfig.from_pretrained(path)
    attention = attention_implementation(dtype, what="the Whisper encoder")
    encoder = WhisperEncoder._from_config(config, dtype=dtype, attn_implementation=attention)
    extractor = _feature_extractor(path, "--audio_encoder")
    _say_cost(extractor)
    return WhisperAudioEncoder(encoder.eval(), extractor, source=source)
