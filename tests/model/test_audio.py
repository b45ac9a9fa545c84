"""Tests for vitacore.model.audio: encoder + adapter token arithmetic, names, save/load."""

import json
import os

import pytest
import torch

from vitacore.data.audio import audio_token_length
from vitacore.model.audio import (
    AUDIO_CONFIG_FILE,
    AudioAdapter,
    AudioEncoder,
    AudioEncoderConfig,
    load_audio_encoder,
)

MEL = 16
CONFIG = AudioEncoderConfig(num_mel_bins=MEL, hidden_size=8, num_layers=1, num_heads=2, ffn_size=16)
LLM_HIDDEN = 12


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    return AudioEncoder(CONFIG).eval()


@pytest.fixture(scope="module")
def adapter():
    torch.manual_seed(1)
    return AudioAdapter(CONFIG.hidden_size, LLM_HIDDEN).eval()


@pytest.fixture
def one_thread():
    """Many tiny forwards: one intra-op thread avoids thread hand-off overhead on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _vita_length(frames):
    """VITA's own definition: len(x[2::2][2::2][0::2]) for a length-`frames` sequence."""
    return len(list(range(frames))[2::2][2::2][0::2])


def test_token_count_matches_audio_token_length(encoder, adapter, one_thread):
    torch.manual_seed(0)
    for frames in range(9, 201):
        features = torch.randn(1, frames, MEL)
        with torch.no_grad():
            states, out_lengths = encoder(features, torch.tensor([frames]))
            tokens = adapter(states)
        assert states.shape[1] == int(out_lengths[0]), frames
        assert tokens.shape == (1, audio_token_length(frames), LLM_HIDDEN), frames
        assert tokens.shape[1] == _vita_length(frames), frames


def test_padded_batch_lengths_match_per_clip_token_counts(encoder, adapter):
    lengths = [200, 37, 90, 9]
    features = torch.zeros(len(lengths), max(lengths), MEL)
    for i, n in enumerate(lengths):
        features[i, :n] = torch.randn(n, MEL)
    with torch.no_grad():
        states, out_lengths = encoder(features, torch.tensor(lengths))
        tokens = adapter(states)
    assert tokens.shape[1] == audio_token_length(max(lengths))
    for i, n in enumerate(lengths):
        # ceil(encoder_length / 2) tokens carry clip i
        assert (int(out_lengths[i]) + 1) // 2 == audio_token_length(n)


def test_padding_does_not_change_valid_encoder_outputs(encoder):
    torch.manual_seed(3)
    clip = torch.randn(1, 41, MEL)
    padded = torch.cat([clip, torch.randn(1, 30, MEL)], dim=1)
    with torch.no_grad():
        alone, n_alone = encoder(clip, torch.tensor([41]))
        batched, n_batched = encoder(padded, torch.tensor([41]))
    n = int(n_alone[0])
    assert int(n_batched[0]) == n
    # every valid output frame's receptive field ends before frame 41, and padded frames are masked
    torch.testing.assert_close(batched[0, :n], alone[0, :n], atol=1e-5, rtol=1e-4)


def test_adapter_parameter_names_are_vitas():
    adapter = AudioAdapter(8, 12)
    names = set(adapter.state_dict())
    assert names == {
        "conv1d2.weight", "conv1d2.bias", "bn2.weight", "bn2.bias", "project.weight", "project.bias",
    }
    assert adapter.conv1d2.weight.shape == (16, 8, 5)
    assert adapter.conv1d2.stride == (2,)
    assert adapter.project.weight.shape == (12, 16)


def test_adapter_output_length_is_ceil_half(adapter, one_thread):
    for t in range(1, 30):
        out = adapter(torch.randn(2, t, CONFIG.hidden_size))
        assert out.shape == (2, -(-t // 2), LLM_HIDDEN)


def test_save_load_round_trip_gives_identical_outputs(tmp_path, encoder):
    folder = tmp_path / "enc"
    encoder.save(str(folder))
    with open(folder / AUDIO_CONFIG_FILE) as fh:
        saved = json.load(fh)
    assert saved["num_mel_bins"] == MEL and saved["hidden_size"] == CONFIG.hidden_size

    loaded = load_audio_encoder(str(folder)).eval()
    assert loaded.config == CONFIG
    assert loaded.source == os.path.abspath(folder)
    for key, value in encoder.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    features = torch.randn(2, 50, MEL)
    lengths = torch.tensor([50, 33])
    with torch.no_grad():
        a, la = encoder(features, lengths)
        b, lb = loaded(features, lengths)
    assert torch.equal(la, lb)
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_load_from_folder_without_config_names_the_flag(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError) as err:
        load_audio_encoder(str(tmp_path))
    assert "--audio_encoder" in str(err.value)
    assert str(tmp_path) in str(err.value)


def test_load_from_missing_folder_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="--audio_encoder"):
        load_audio_encoder(str(tmp_path / "nope"))
