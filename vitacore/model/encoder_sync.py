"""Dummy encoder passes that keep ranks in step when a micro-batch lacks a modality.

Under ZeRO-3 every module's parameters are gathered collectively when it runs, and trainable
encoder parameters need a gradient on every rank; so with several ranks an encoder whose media a
micro-batch lacks still runs once, on a dummy input, and its zero-weighted output joins the loss.
"""

from __future__ import annotations

from typing import Optional

import torch


def dummy_image_output(model, device) -> Optional[torch.Tensor]:
    """With ``model.run_all_encoders``: the tower and projector on one blank image, summed (else None)."""
    if not model.run_all_encoders or model.vision_tower is None or model.mm_projector is None:
        return None
    size = model.vision_tower.image_spec.image_size
    return sum(block.sum() for block in model.encode_images(torch.zeros(1, 3, size, size, device=device)))


def dummy_audio_output(model, device) -> Optional[torch.Tensor]:
    """With ``model.run_all_encoders``: the audio encoder and adapter on one silent clip, summed (else None)."""
    if not model.run_all_encoders or model.audio_encoder is None or model.audio_adapter is None:
        return None
    frames = 16  # the shortest clip the subsampling convolutions accept comfortably (Whisper pads it)
    mel = model.audio_encoder.num_mel_bins  # the encoder's own input width (80 fbank bins, Whisper's mels)
    blocks = model.encode_audio(torch.zeros(1, frames, mel, device=device),
                                torch.tensor([frames], device=device), torch.tensor([1], device=device))
    return sum(block.sum() for block in blocks)
