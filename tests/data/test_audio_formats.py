"""FLAC / MP3 decoding through soundfile, next to the pure-Python WAV path."""

import numpy as np
import pytest

from vitacore.data.audio import AudioTransform, load_wav, wav_num_samples, write_wav

soundfile = pytest.importorskip("soundfile")


def _tone(seconds=1.0, sr=16000):
    t = np.arange(int(seconds * sr)) / sr
    return (0.4 * np.sin(2 * np.pi * 440 * t) + 0.1 * np.sin(2 * np.pi * 1234 * t)).astype(np.float32)


def _require(fmt):
    if fmt not in soundfile.available_formats():
        pytest.skip(f"this libsndfile cannot write {fmt}")


def test_flac_loads_the_same_samples_as_wav(tmp_path):
    _require("FLAC")
    x = _tone()
    write_wav(tmp_path / "a.wav", x, 16000)
    soundfile.write(tmp_path / "a.flac", x, 16000, subtype="PCM_16")
    wav, flac = load_wav(tmp_path / "a.wav"), load_wav(tmp_path / "a.flac")
    assert flac.shape == wav.shape
    assert float((flac - wav).abs().max()) < 1e-4  # both 16-bit PCM: lossless, same scaling


def test_flac_stereo_and_resampled(tmp_path):
    _require("FLAC")
    x = _tone(sr=22050)
    stereo = np.stack([x, 0.5 * x], axis=1)
    write_wav(tmp_path / "s.wav", stereo, 22050)
    soundfile.write(tmp_path / "s.flac", stereo, 22050, subtype="PCM_16")
    wav, flac = load_wav(tmp_path / "s.wav", 16000), load_wav(tmp_path / "s.flac", 16000)
    assert flac.shape == wav.shape == (16000,)
    assert float((flac - wav).abs().max()) < 1e-3
    assert wav_num_samples(tmp_path / "s.flac", 16000) == wav_num_samples(tmp_path / "s.wav", 16000) == 16000


def test_mp3_loads_close_to_wav(tmp_path):
    _require("MP3")
    x = _tone(seconds=2.0)
    write_wav(tmp_path / "a.wav", x, 16000)
    soundfile.write(tmp_path / "a.mp3", x, 16000, format="MP3", subtype="MPEG_LAYER_III")
    wav, mp3 = load_wav(tmp_path / "a.wav").numpy(), load_wav(tmp_path / "a.mp3").numpy()
    # MP3 adds encoder delay/padding; align on the best lag before comparing.
    assert abs(len(mp3) - len(wav)) < 4000
    n = min(len(wav), len(mp3)) - 3000
    lags = range(0, 2000)
    errs = [np.sqrt(np.mean((mp3[k:k + n] - wav[:n]) ** 2)) for k in lags]
    assert min(errs) < 0.05 * np.sqrt(np.mean(wav ** 2)) + 0.01
    assert wav_num_samples(tmp_path / "a.mp3", 16000) > 0


@pytest.mark.parametrize("name", ["bad.flac", "bad.mp3"])
def test_corrupt_compressed_audio_names_file(tmp_path, name):
    (tmp_path / name).write_bytes(b"not audio at all" * 64)
    with pytest.raises(ValueError, match=name):
        load_wav(tmp_path / name)
    with pytest.raises(ValueError, match=name):
        AudioTransform()(tmp_path / name)
    assert wav_num_samples(tmp_path / name, 16000) == 0


def test_missing_flac_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="gone.flac"):
        load_wav(tmp_path / "gone.flac")


def test_header_token_count_matches_decoding_for_flac(tmp_path):
    _require("FLAC")
    soundfile.write(tmp_path / "a.flac", _tone(1.37, 44100), 44100, subtype="PCM_16")
    transform = AudioTransform()
    _, tokens = transform(tmp_path / "a.flac")
    assert transform.num_tokens_from_header(tmp_path / "a.flac") == tokens


def test_whisper_transform_header_handles_flac(tmp_path):
    _require("FLAC")
    from vitacore.data.whisper_audio import WhisperAudioTransform

    class _FE:  # the attributes WhisperAudioTransform reads from a feature extractor
        sampling_rate = 16000
        hop_length = 160
        n_samples = 480000
        feature_size = 80
        n_fft = 400
        nb_max_frames = 3000
        chunk_length = 30

    soundfile.write(tmp_path / "a.flac", _tone(2.0), 16000, subtype="PCM_16")
    transform = WhisperAudioTransform(_FE())
    assert transform.num_tokens_from_header(tmp_path / "a.flac") > 0
