"""Audio features for VITA-1.5's own ("whale") audio encoder: Kaldi fbank through ``kaldi-native-fbank``.

VITA computes them with torchaudio: load the file (float32, ``int16 / 32768``, every channel), resample
to the yaml's ``resample_rate`` with ``torchaudio.transforms.Resample`` defaults (Hann-windowed sinc,
``lowpass_filter_width`` 6, ``rolloff`` 0.99), multiply by ``2**15`` and call
``torchaudio.compliance.kaldi.fbank`` with the yaml's mel bins, frame length/shift and dither, and
``energy_floor=0``. Kaldi's defaults do the rest: channel 0 of a multi-channel file (torchaudio's
``channel=-1`` is clamped to 0), snipped edges, DC removal, pre-emphasis 0.97, Povey window, FFT size
rounded up to a power of two, power spectrum, Kaldi mel banks from 20 Hz to Nyquist, log floored at
float32 epsilon, no energy column.

Here the file is read by :func:`vitacore.data.audio.load_audio_channels` (torchaudio's scaling),
resampled by :func:`sinc_resample` (torchaudio's kernel, written out below) and the fbank comes from
the ``kaldi-native-fbank`` library with the same options. torchaudio is not used: its compiled
extension must match the torch build exactly.

One deliberate difference: VITA's ``process`` passes the file's *original* rate as
``sample_frequency`` after resampling (the line updating it is commented out), so a 44.1 kHz clip is
framed as if 16 kHz audio were 44.1 kHz (1102-sample windows, mel banks to 22 kHz). Here the fbank
runs at the rate the audio was resampled to; files already at that rate (VITA's data) are unaffected.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Dict, Optional, Tuple, Union

import numpy as np
import torch

from vitacore.data.audio import load_audio_channels, wav_num_samples

__all__ = ["MIN_ENCODER_FRAMES", "FbankSettings", "KaldiFbankTransform", "sinc_resample", "whale_token_count"]

PathLike = Union[str, "os.PathLike[str]"]

# VITA's encoder subsamples time by 4 with two unpadded stride-2 convolutions (kernel 3): fewer than
# 7 frames leave it nothing to emit.
MIN_ENCODER_FRAMES = 7


@dataclass(frozen=True)
class FbankSettings:
    """The ``resample_conf`` / ``fbank_conf`` values of a VITA audio-encoder yaml.

    Attributes:
        sample_rate: Rate audio is resampled to before the fbank (``resample_conf.resample_rate``).
        num_mel_bins: Mel filters (``fbank_conf.num_mel_bins``).
        frame_length_ms: Frame (window) length in milliseconds (``fbank_conf.frame_length``).
        frame_shift_ms: Hop between frames in milliseconds (``fbank_conf.frame_shift``).
        dither: Standard deviation of Gaussian noise added to every sample of every frame, on the
            int16 scale (``fbank_conf.dither``); 0 gives deterministic features.
    """

    sample_rate: int = 16000
    num_mel_bins: int = 80
    frame_length_ms: float = 25.0
    frame_shift_ms: float = 10.0
    dither: float = 0.0


def whale_token_count(num_frames: int, adapter_stride: int = 2) -> int:
    """LLM tokens VITA's audio encoder emits for ``num_frames`` fbank frames.

    The encoder keeps ``len(x[2::2][2::2])`` positions of a length-``num_frames`` sequence ``x``; the
    ``subsampling`` adapter (``adapter_stride=2``) then keeps ``[0::2]`` of those, the ``cnn`` and
    ``linear`` adapters (``adapter_stride=1``) all of them.

    Args:
        num_frames: Number of fbank frames (``T``).
        adapter_stride: 2 for the ``subsampling`` adapter, 1 for ``cnn`` / ``linear``.

    Returns:
        The number of audio embedding positions in the LLM input.
    """
    if num_frames < 0:
        raise ValueError(f"kaldi_fbank.py: num_frames must be non-negative, got {num_frames}")
    if adapter_stride not in (1, 2):
        raise ValueError(f"kaldi_fbank.py: adapter_stride must be 2 (subsampling adapter) or 1 (cnn/linear "
                         f"adapter), got {adapter_stride}")
    # len(v[s::2]) == max(0, ceil((len(v) - s) / 2))
    kept = max(0, (num_frames - 1) // 2)
    kept = max(0, (kept - 1) // 2)
    return (kept + 1) // 2 if adapter_stride == 2 else kept


# Resampling kernels by (reduced orig rate, reduced new rate, width, rolloff); a few KiB each.
_KERNELS: Dict[Tuple[int, int, int, float], Tuple[torch.Tensor, int]] = {}


def _sinc_kernel(orig: int, new: int, lowpass_filter_width: int, rolloff: float) -> Tuple[torch.Tensor, int]:
    """torchaudio's ``sinc_interp_hann`` filter bank for reduced rates ``orig -> new``.

    Output sample ``k * new + phase`` sits at input time ``k * orig + phase * orig / new``. Row
    ``phase`` of the returned ``(new, 1, 2 * width + orig)`` float32 tensor weighs input samples
    ``k * orig - width ... k * orig + width + orig - 1`` for it; ``width`` is returned too.
    """
    cutoff = min(orig, new) * rolloff  # in units of the reduced rates
    width = math.ceil(lowpass_filter_width * orig / cutoff)
    taps = torch.arange(-width, width + orig, dtype=torch.float64)
    phases = torch.arange(new, dtype=torch.float64)[:, None]
    # Distance from each tap to the output time, scaled so the sinc's zeros fall on integers.
    t = (taps[None, :] / orig - phases / new) * cutoff
    t = t.clamp(-lowpass_filter_width, lowpass_filter_width)
    hann = torch.cos(t * (math.pi / (2 * lowpass_filter_width))) ** 2
    kernel = torch.special.sinc(t) * hann * (cutoff / orig)
    # torchaudio's Resample caches its kernel in float32; so does this.
    return kernel.to(torch.float32)[:, None, :], width


def sinc_resample(
    waveform: torch.Tensor,
    orig_rate: int,
    new_rate: int,
    lowpass_filter_width: int = 6,
    rolloff: float = 0.99,
) -> torch.Tensor:
    """Resamples like ``torchaudio.transforms.Resample(orig_rate, new_rate)`` with its defaults.

    Band-limited interpolation with a Hann-windowed sinc (``sinc_interp_hann``): the cutoff is
    ``rolloff`` times the lower Nyquist rate, the kernel spans ``lowpass_filter_width`` zero crossings
    on each side, the signal is zero outside the clip, and the kernel is float32 as in torchaudio's
    transform.

    Args:
        waveform: Float tensor of shape ``(..., num_samples)``.
        orig_rate: Input rate in Hz (integer).
        new_rate: Output rate in Hz (integer).
        lowpass_filter_width: Zero crossings of the sinc kept on each side.
        rolloff: Cutoff as a fraction of the lower Nyquist rate.

    Returns:
        A float32 tensor of shape ``(..., ceil(num_samples * new_rate / orig_rate))``.
    """
    if int(orig_rate) != orig_rate or int(new_rate) != new_rate or orig_rate <= 0 or new_rate <= 0:
        raise ValueError(f"kaldi_fbank.py: sample rates must be positive integers, got {orig_rate} -> {new_rate}")
    x = waveform.to(torch.float32)
    if orig_rate == new_rate:
        return x.clone()
    g = math.gcd(int(orig_rate), int(new_rate))
    orig, new = int(orig_rate) // g, int(new_rate) // g
    key = (orig, new, lowpass_filter_width, rolloff)
    if key not in _KERNELS:
        _KERNELS[key] = _sinc_kernel(orig, new, lowpass_filter_width, rolloff)
    kernel, width = _KERNELS[key]
    shape = x.shape
    length = shape[-1]
    flat = torch.nn.functional.pad(x.reshape(-1, 1, length), (width, width + orig))
    out = torch.nn.functional.conv1d(flat, kernel, stride=orig)  # (batch, new, blocks)
    out = out.transpose(1, 2).reshape(flat.shape[0], -1)
    target = -(-length * new // orig)
    return out[:, :target].reshape(*shape[:-1], target)


def _frame_sizes(settings: FbankSettings) -> Tuple[int, int]:
    """(window, shift) in samples, as torchaudio (float64) and kaldi-native-fbank (float32) both compute them."""
    rate, length, shift = settings.sample_rate, settings.frame_length_ms, settings.frame_shift_ms
    torch_sizes = (int(rate * length * 0.001), int(rate * shift * 0.001))
    f32 = np.float32
    knf_sizes = (int(f32(rate) * f32(0.001) * f32(length)), int(f32(rate) * f32(0.001) * f32(shift)))
    if torch_sizes != knf_sizes:
        raise ValueError(f"kaldi_fbank.py: frame_length_ms={length} / frame_shift_ms={shift} at {rate} Hz round to "
                         f"{torch_sizes} samples in torchaudio but {knf_sizes} in kaldi-native-fbank; choose "
                         "values that are whole numbers of samples")
    return torch_sizes


class KaldiFbankTransform:
    """Loads an audio file and returns VITA's Kaldi fbank features plus the LLM token count.

    The interface of :class:`vitacore.data.audio.AudioTransform`, so the dataset takes either.

    With ``settings.dither > 0`` every frame gets Gaussian noise of that standard deviation (on the
    int16 scale) before DC removal, as in Kaldi and in VITA (whose yaml may set ``dither: 1.0``):
    features then differ from call to call, as they do in VITA. The noise comes from
    kaldi-native-fbank, which seeds a ``rand_r`` state per frame from the C library's process-wide
    ``rand()``; its API has no seed, and ``torch.manual_seed`` does not reach it, so dithered features
    cannot be made reproducible (nor equal to torchaudio's, which draws from torch's generator).

    Args:
        settings: The encoder yaml's resample / fbank values (default: :class:`FbankSettings` defaults).
        adapter_stride: 2 for VITA's ``subsampling`` adapter, 1 for its ``cnn`` / ``linear`` adapters
            (see :func:`whale_token_count`).

    Attributes:
        sample_rate: Rate the audio is resampled to before feature extraction.
        num_mel_bins: Number of mel filterbank bins (the feature width).
    """

    def __init__(self, settings: Optional[FbankSettings] = None, adapter_stride: int = 2):
        settings = FbankSettings() if settings is None else settings
        if adapter_stride not in (1, 2):
            raise ValueError(f"kaldi_fbank.py: adapter_stride must be 2 (subsampling adapter) or 1 (cnn/linear "
                             f"adapter), got {adapter_stride}")
        if int(settings.sample_rate) != settings.sample_rate or settings.sample_rate <= 40:
            raise ValueError(f"kaldi_fbank.py: sample_rate must be an integer above 40 Hz (the mel banks start at "
                             f"20 Hz), got {settings.sample_rate}")
        if settings.num_mel_bins <= 3:
            raise ValueError(f"kaldi_fbank.py: Kaldi needs more than 3 mel bins, got {settings.num_mel_bins}")
        if settings.dither < 0:
            raise ValueError(f"kaldi_fbank.py: dither must be >= 0 (0 turns it off), got {settings.dither}")
        window, shift = _frame_sizes(settings)
        if window < 2 or shift < 1:
            raise ValueError(f"kaldi_fbank.py: frames of {window} samples every {shift} at {settings.sample_rate} Hz; "
                             "raise frame_length_ms / frame_shift_ms")
        self.settings = settings
        self.adapter_stride = adapter_stride
        self.sample_rate = int(settings.sample_rate)
        self.num_mel_bins = int(settings.num_mel_bins)
        self.window, self.shift = window, shift

    def __repr__(self) -> str:
        s = self.settings
        return (f"KaldiFbankTransform(sample_rate={self.sample_rate}, num_mel_bins={self.num_mel_bins}, "
                f"frame_length_ms={s.frame_length_ms:g}, frame_shift_ms={s.frame_shift_ms:g}, dither={s.dither:g}, "
                f"adapter_stride={self.adapter_stride})")

    def _options(self):
        """kaldi-native-fbank options for torchaudio's ``kaldi.fbank`` as VITA calls it."""
        import kaldi_native_fbank as knf

        opts = knf.FbankOptions()
        frame = opts.frame_opts
        frame.samp_freq = float(self.sample_rate)
        frame.frame_length_ms = float(self.settings.frame_length_ms)
        frame.frame_shift_ms = float(self.settings.frame_shift_ms)
        frame.dither = float(self.settings.dither)  # knf's default is 3e-5, not Kaldi's
        frame.preemph_coeff = 0.97
        frame.remove_dc_offset = True
        frame.window_type = "povey"
        frame.round_to_power_of_two = True
        frame.snip_edges = True
        mel = opts.mel_opts
        mel.num_bins = self.num_mel_bins
        mel.low_freq = 20.0
        mel.high_freq = 0.0  # Nyquist
        mel.is_librosa = False  # Kaldi's mel banks
        mel.htk_mode = False
        opts.use_energy = False
        opts.energy_floor = 0.0
        opts.raw_energy = True
        opts.htk_compat = False
        opts.use_log_fbank = True
        opts.use_power = True
        return opts

    def num_frames(self, num_samples: int) -> int:
        """Fbank frames of a clip of ``num_samples`` samples at :attr:`sample_rate` (snipped edges)."""
        return 0 if num_samples < self.window else 1 + (num_samples - self.window) // self.shift

    def __call__(self, path: PathLike) -> Tuple[torch.Tensor, int]:
        """Processes one audio file.

        Args:
            path: Audio file path (WAV, FLAC, MP3 or OGG); only channel 0 of a multi-channel file is used.

        Returns:
            ``(features, num_llm_tokens)``: a float32 ``(T, num_mel_bins)`` tensor and
            :func:`whale_token_count` of ``T``.

        Raises:
            FileNotFoundError: If the file is missing.
            ValueError: If the file is unreadable, or too short for VITA's encoder (under
                :data:`MIN_ENCODER_FRAMES` frames); the message names the file.
        """
        import kaldi_native_fbank as knf

        name = os.fspath(path)
        channels, rate = load_audio_channels(name)
        waveform = torch.from_numpy(channels[0])
        if rate != self.sample_rate:
            waveform = sinc_resample(waveform, rate, self.sample_rate)
        samples = waveform.numel()
        frames = self.num_frames(samples)
        if frames == 0:
            raise ValueError(f"{name}: the audio clip is shorter than one {self.settings.frame_length_ms:g} ms frame "
                             f"({samples} samples at {self.sample_rate} Hz < {self.window}); drop the record or "
                             "use a longer clip")
        if frames < MIN_ENCODER_FRAMES:
            need = self.window + (MIN_ENCODER_FRAMES - 1) * self.shift
            raise ValueError(f"{name}: the audio clip gives {frames} fbank frames; VITA's audio encoder needs at least "
                             f"{MIN_ENCODER_FRAMES} ({need} samples, {1000 * need / self.sample_rate:g} ms at "
                             f"{self.sample_rate} Hz); drop the record or use a longer clip")
        extractor = knf.OnlineFbank(self._options())
        extractor.accept_waveform(float(self.sample_rate), (waveform * 32768.0).tolist())
        extractor.input_finished()
        if extractor.num_frames_ready != frames:
            raise ValueError(f"{name}: kaldi-native-fbank made {extractor.num_frames_ready} frames where {frames} were "
                             "expected; the frame settings disagree (report this with the settings used)")
        features = np.stack([extractor.get_frame(i) for i in range(frames)]).astype(np.float32, copy=False)
        return torch.from_numpy(features), whale_token_count(frames, self.adapter_stride)

    def num_tokens_from_header(self, path: PathLike) -> int:
        """LLM tokens of the clip at ``path`` from its header alone (no samples decoded).

        The same integer arithmetic as :meth:`__call__`: the resampled length is
        ``ceil(samples * new / old)`` (torchaudio's), then snipped-edge framing, then
        :func:`whale_token_count`. Exact for a well-formed file; a truncated WAV data chunk
        overestimates, and an unreadable file counts 0 (the call reports it).
        """
        return whale_token_count(self.num_frames(wav_num_samples(path, self.sample_rate)), self.adapter_stride)
