"""Whisper's encoder as the audio encoder: features, padding to the window, token counts, errors."""

import json
import math
import os
import shutil

import pytest
import torch
import torch.nn as nn
from tiny_families import WHISPER_MEL, WHISPER_SECONDS, save_tiny_whisper, tone
from transformers import WhisperFeatureExtractor
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from vitacore.data.audio import AudioTransform, load_wav, write_wav
from vitacore.data.dataset import Collator, Sample
from vitacore.data.whisper_audio import WhisperAudioTransform, whisper_token_length
from vitacore.model.audio import AudioAdapter, build_audio_encoder, load_audio_encoder
from vitacore.model.encoder_sync import dummy_audio_output
from vitacore.model.multimodal import VitaModel
from vitacore.model.whisper import WhisperAudioEncoder
from vitacore.recipes import model_inputs

SECONDS = (0.05, 0.4, 1.0, 1.37, WHISPER_SECONDS)


def audio_transform_for(encoder):
    """The data pipeline's audio transform for a model with ``encoder``, as a run picks it."""
    return model_inputs(VitaModel(nn.Identity(), audio_encoder=encoder)).audio_transform


@pytest.fixture(scope="module")
def whisper_path(tmp_path_factory):
    return save_tiny_whisper(tmp_path_factory.mktemp("whisper") / "tiny-whisper")


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    root = tmp_path_factory.mktemp("clips")
    paths = []
    for i, seconds in enumerate(SECONDS):
        path = str(root / f"clip{i}.wav")
        write_wav(path, tone(seconds, 220.0 * (i + 1)), 16000)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def encoder(whisper_path):
    return load_audio_encoder(whisper_path, torch.float32).eval()


def test_loads_the_encoder_weights_of_the_checkpoint(whisper_path, encoder):
    from safetensors.torch import load_file

    assert isinstance(encoder, WhisperAudioEncoder) and isinstance(encoder.encoder, WhisperEncoder)
    assert encoder.hidden_size == 16 and encoder.num_mel_bins == WHISPER_MEL
    assert encoder.source == os.path.abspath(whisper_path) and encoder.window_frames == WHISPER_SECONDS * 100
    saved = load_file(os.path.join(whisper_path, "model.safetensors"))
    ours = encoder.encoder.state_dict()
    assert set(ours) == {k[len("model.encoder."):] for k in saved if k.startswith("model.encoder.")}
    assert all(torch.equal(v, saved["model.encoder." + k]) for k, v in ours.items())
    assert not any("decoder" in name for name, _ in encoder.named_parameters())


def test_features_are_whisper_log_mel_of_the_clip(whisper_path, clips, encoder):
    transform = audio_transform_for(encoder)
    assert isinstance(transform, WhisperAudioTransform) and transform.num_mel_bins == WHISPER_MEL
    extractor = WhisperFeatureExtractor.from_pretrained(whisper_path)
    for path, seconds in zip(clips, SECONDS):
        features, tokens = transform(path)
        samples = load_wav(path).numel()
        full = extractor(load_wav(path).numpy(), sampling_rate=16000, return_tensors="pt")["input_features"][0].T
        frames = min(math.ceil((samples + 200) / 160), full.shape[0])
        assert features.shape == (frames, WHISPER_MEL), seconds
        assert torch.equal(features, full[:frames])
        assert tokens == whisper_token_length(frames) == math.ceil(math.ceil(frames / 2) / 2)


def test_padding_in_the_encoder_reproduces_the_extractor_window(whisper_path, clips, encoder):
    """The clip's frames, padded by the wrapper, give the states of Whisper's full 30 s-style input."""
    extractor = WhisperFeatureExtractor.from_pretrained(whisper_path)
    transform = WhisperAudioTransform(extractor)
    for path in clips:
        features, _ = transform(path)
        full = extractor(load_wav(path).numpy(), sampling_rate=16000, return_tensors="pt")["input_features"]
        with torch.no_grad():
            expected = encoder.encoder(full).last_hidden_state
            states, lengths = encoder(features[None], torch.tensor([features.shape[0]]))
        assert int(lengths[0]) == (features.shape[0] + 1) // 2 == states.shape[1]
        torch.testing.assert_close(states, expected[:, : states.shape[1]], rtol=0, atol=1e-6)


def test_encode_audio_blocks_have_the_token_counts_the_data_predicted(clips, encoder):
    transform = audio_transform_for(encoder)
    torch.manual_seed(0)
    model = VitaModel(nn.Identity(), audio_encoder=encoder, audio_adapter=AudioAdapter(16, 24)).eval()
    samples = []
    for i, path in enumerate(clips):
        features, tokens = transform(path)
        samples.append(Sample(str(i), [1], [1], [], [features], [tokens], "lang"))
    batch = Collator(pad_token_id=0)(samples)
    with torch.no_grad():
        blocks = model.encode_audio(batch["audios"], batch["audio_lengths"], batch["audio_token_lengths"])
        alone = [model.encode_audio(s.audios[0][None], torch.tensor([s.audios[0].shape[0]]),
                                    torch.tensor(s.audio_token_lengths))[0] for s in samples]
    assert [b.shape for b in blocks] == [(s.audio_token_lengths[0], 24) for s in samples]
    for batched, single in zip(blocks, alone):  # a clip's block does not depend on its batch-mates
        torch.testing.assert_close(batched, single, rtol=0, atol=1e-5)


def test_dummy_audio_pass_uses_the_encoder_mel_bins(encoder):
    model = VitaModel(nn.Identity(), audio_encoder=encoder, audio_adapter=AudioAdapter(16, 24))
    model.run_all_encoders = True
    out = dummy_audio_output(model, torch.device("cpu"))
    assert out.dim() == 0 and torch.isfinite(out)
    out.backward()  # the adapter takes part in backward
    assert model.audio_adapter.project.weight.grad is not None


def test_tiny_encoder_gets_fbank_of_its_own_mel_bins(tmp_path):
    from vitacore.model.audio import AudioEncoder, AudioEncoderConfig

    AudioEncoder(AudioEncoderConfig(num_mel_bins=40, hidden_size=8, num_layers=1, num_heads=2, ffn_size=16)).save(
        str(tmp_path / "enc"))
    transform = audio_transform_for(load_audio_encoder(str(tmp_path / "enc")))
    assert isinstance(transform, AudioTransform) and transform.num_mel_bins == 40


def test_build_without_weights_has_the_same_shapes(whisper_path, encoder):
    built = build_audio_encoder(whisper_path, torch.float32, "recorded/path")
    assert isinstance(built, WhisperAudioEncoder) and built.source == "recorded/path"
    assert {k: v.shape for k, v in built.state_dict().items()} == {k: v.shape for k, v in encoder.state_dict().items()}


def test_cost_is_said_once_at_load(whisper_path, vitacore_log):
    load_audio_encoder(whisper_path, torch.float32)
    lines = vitacore_log.lines
    notes = [line for line in lines if "window" in line]
    assert len(notes) == 1 and f"{WHISPER_SECONDS} s" in notes[0] and "encoder pass" in notes[0]
    assert any("attention for the Whisper encoder: sdpa" in line for line in lines)


def test_clip_longer_than_the_window_names_the_file(tmp_path, encoder):
    path = str(tmp_path / "long.wav")
    write_wav(path, tone(WHISPER_SECONDS + 0.5), 16000)
    with pytest.raises(ValueError) as err:
        audio_transform_for(encoder)(path)
    assert path in str(err.value) and f"at most {WHISPER_SECONDS} s" in str(err.value)
    with pytest.raises(ValueError, match="window"):
        encoder(torch.zeros(1, encoder.window_frames + 1, WHISPER_MEL), torch.tensor([encoder.window_frames + 1]))


def test_checkpoint_without_feature_extractor_names_the_flag_and_file(tmp_path, whisper_path):
    bare = tmp_path / "bare"
    shutil.copytree(whisper_path, bare)
    os.remove(bare / "preprocessor_config.json")
    with pytest.raises(FileNotFoundError) as err:
        load_audio_encoder(str(bare), torch.float32)
    assert "--audio_encoder" in str(err.value) and "preprocessor_config.json" in str(err.value)


def test_mismatched_feature_extractor_is_refused(tmp_path, whisper_path):
    other = tmp_path / "other"
    shutil.copytree(whisper_path, other)
    WhisperFeatureExtractor(feature_size=WHISPER_MEL, chunk_length=WHISPER_SECONDS + 1).save_pretrained(other)
    with pytest.raises(ValueError, match="frames per clip"):
        load_audio_encoder(str(other), torch.float32)


def test_other_folders_are_refused_naming_both_kinds(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "wav2vec2"}))
    with pytest.raises(FileNotFoundError) as err:
        load_audio_encoder(str(tmp_path))
    assert "Whisper" in str(err.value) and "vitacore_audio_config.json" in str(err.value)
