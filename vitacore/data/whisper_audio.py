"""Audio features for a Whisper encoder: Whisper's own feature extractor, trimmed to the clip.

Whisper's extractor pads every clip to its window (30 s, 3000 log-mel frames) and normalizes over
the whole window. This transform returns the frames that hold any of the clip's samples; every frame
after them is the extractor's "silence" value, which the encoder wrapper
(:class:`vitacore.model.whisper.WhisperAudioEncoder`) puts back, so the encoder sees exactly what
Whisper's extractor produced while batches stay as short as their longest clip.
"""

from __future__ import annotations

import math
import os
from typing import Tuple, Union

import torch

from vitacore.data.audio import load_wav, wav_num_samples

PathLike = Union[str, "os.PathLike[str]"]


def whisper_token_length(num_frames: int) -> int:
    """LLM tokens for ``num_frames`` log-mel frames: Whisper's stride-2 conv, then the adapter's stride 2."""
    if num_frames < 0:
        raise ValueError(f"num_frames must be non-negative, got {num_frames}")
    states = (num_frames + 1) // 2  # encoder states centred on the clip's frames
    return (states + 1) // 2


def whisper_silence_value(features: torch.Tensor) -> torch.Tensor:
    """The value Whisper's extractor gives frames of padding, for each clip of ``(..., frames, mel)`` features.

    The extractor floors log10 power at 1e-10 (-10), clamps everything to (max - 8), then maps x to
    (x + 4) / 4; a padding frame is therefore max(clip max - 2, -1.5) in the normalized features.
    """
    return torch.clamp(features.amax(dim=(-2, -1)) - 2.0, min=-1.5)


class WhisperAudioTransform:
    """Loads an audio file (WAV/FLAC/MP3) and returns Whisper log-mel features of the clip plus its LLM token count.

    Args:
        feature_extractor: a ``transformers.WhisperFeatureExtractor`` (from the encoder's folder).
    """

    def __init__(self, feature_extractor):
        self.feature_extractor = feature_extractor
        self.sample_rate = feature_extractor.sampling_rate
        self.num_mel_bins = feature_extractor.feature_size

    def __repr__(self) -> str:
        fe = self.feature_extractor
        return (f"WhisperAudioTransform(num_mel_bins={self.num_mel_bins}, sample_rate={self.sample_rate}, "
                f"window={fe.chunk_length} s)")

    def __call__(self, path: PathLike) -> Tuple[torch.Tensor, int]:
        """Processes one audio file.

        Returns:
            ``(features, num_llm_tokens)``: a float32 ``(frames, num_mel_bins)`` tensor (the clip's
            frames of the extractor's output) and :func:`whisper_token_length` of ``frames``.

        Raises:
            FileNotFoundError: the file is missing.
            ValueError: unreadable, empty, or longer than the encoder's window.
        """
        fe = self.feature_extractor
        waveform = load_wav(path, target_sample_rate=self.sample_rate)
        samples = waveform.numel()
        if samples == 0:
            raise ValueError(f"{os.fspath(path)}: the audio clip is empty")
        if samples > fe.n_samples:
            raise ValueError(f"{os.fspath(path)}: the clip is {samples / self.sample_rate:.1f} s; the Whisper encoder "
                             f"reads at most {fe.chunk_length} s (cut the clip, or use another --audio_encoder)")
        features = fe(waveform.numpy(), sampling_rate=self.sample_rate, return_tensors="pt")["input_features"][0].T
        # Frame i covers samples [i * hop - n_fft / 2, i * hop + n_fft / 2): keep every frame that sees the clip.
        frames = min(math.ceil((samples + fe.n_fft // 2) / fe.hop_length), features.shape[0])
        return features[:frames].to(torch.float32).contiguous(), whisper_token_length(frames)

    def num_tokens_from_header(self, path: PathLike) -> int:
        """LLM tokens of the clip at ``path`` from its WAV header alone: the frame arithmetic of
        :meth:`__call__`, exact for a well-formed WAV (0 for an unreadable one)."""
        fe = self.feature_extractor
        samples = wav_num_samples(path, self.sample_rate)
        if samples == 0:
            return 0
        frames = min(math.ceil((samples + fe.n_fft // 2) / fe.hop_length), fe.nb_max_frames)
        return whisper_token_length(frames)
