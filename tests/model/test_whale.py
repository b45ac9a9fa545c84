"""VITA's own audio encoder ("whale") read from VITA's folder: vitacore against VITA's documented behaviour.

Every expectation comes from VITA's source, never from vitacore's output: folders are written by
``tests/whale_folder.py`` (the layout of a released ``train.yaml`` / ``global_cmvn`` / ``final.pt``) and outputs are
compared with ``tests/model/whale_reference.py`` (VITA's forward pass as plain torch functions on ``final.pt``).
"""

import math
import os

import pytest
import torch
from whale_folder import DELETE, edit_yaml, vita_cmvn, write_cmvn, write_vita_audio_encoder
from whale_reference import reference_adapter, reference_encoder, subsampled_mask

from vitacore.model.whale import WHALE_FILES, is_whale_folder, load_whale_folder, read_whale_config

LENGTHS = (120, 97, 50, 11, 7)  # fbank frames; 7 is the shortest clip VITA's Conv2dSubsampling4 accepts
TRANSFORMER = "encoder_conf.para_conf.transformer."
SUBSAMPLING = "encoder_conf.para_conf.subsampling."


def _features(info, lengths, seed=0):
    """Zero-padded fbank-like features whose CMVN output is roughly N(0, 1)."""
    g = torch.Generator().manual_seed(seed)
    mean = info.state.get("encoder.global_cmvn.mean", torch.zeros(info.num_mel_bins))
    istd = info.state.get("encoder.global_cmvn.istd", torch.ones(info.num_mel_bins))
    features = torch.zeros(len(lengths), max(lengths), info.num_mel_bins)
    for i, n in enumerate(lengths):
        features[i, :n] = mean + torch.randn(n, info.num_mel_bins, generator=g) / istd
    return features


def _vitacore(parts, features, lengths):
    """vitacore's encoder, then its adapter on the states with padded frames zeroed (as VITA's adapter does)."""
    with torch.no_grad():
        states, out_lengths = parts.encoder(features, lengths)
        valid = torch.arange(states.shape[1]).unsqueeze(0) < out_lengths.unsqueeze(1)
        embeds = parts.adapter(states * valid.unsqueeze(-1))
    return states, out_lengths, embeds


def _reference(info, features, lengths, **attention):
    chunks = {"chunk_size": info.chunk_size, "left_chunks": info.left_chunks, **attention}
    states, mask4 = reference_encoder(info.state, features, lengths, pos_enc=info.pos_enc, num_heads=info.num_heads,
                                      **chunks)
    embeds, out_mask = reference_adapter(info.state, states, mask4, adapter_type=info.adapter_type,
                                         kernel_size=info.kernel_size, norm=info.norm, activation=info.activation)
    return states, mask4, embeds, out_mask


def _max_diff(a, b, mask):
    return (a - b).abs()[mask].max().item()


def _vita_tokens(frames, adapter_type):
    """VITA's count from a clip's frames: ``len(ones(T)[2::2][2::2])``, then ``[0::2]`` for ``subsampling``."""
    kept = list(range(frames))[2::2][2::2]
    return len(kept[0::2]) if adapter_type == "subsampling" else len(kept)


def test_whale_files_name_vitas_folder_layout():
    assert WHALE_FILES == ("train.yaml", "global_cmvn", "final.pt")


def test_is_whale_folder_is_vitas_layout(tmp_path):
    info = write_vita_audio_encoder(tmp_path / "enc")
    assert is_whale_folder(info.path)
    assert not is_whale_folder(str(tmp_path / "nowhere"))
    os.remove(info.yaml_path)
    assert not is_whale_folder(info.path)


@pytest.mark.parametrize("name", ["global_cmvn", "final.pt"])
def test_folder_without_a_file_is_refused_naming_it(tmp_path, name):
    """VITA opens global_cmvn (load_cmvn) and final.pt (torch.load) unconditionally: neither is optional."""
    info = write_vita_audio_encoder(tmp_path)
    os.remove(os.path.join(info.path, name))
    with pytest.raises(FileNotFoundError, match=name):
        load_whale_folder(info.path)


def test_config_reads_the_yaml_fields(tmp_path):
    info = write_vita_audio_encoder(tmp_path, hidden=24, num_blocks=3, num_heads=6, ffn=40, adapter_type="subsampling",
                                    kernel_size=3, norm="batch", activation="relu", llm_embed_dim=48, dither=1.0,
                                    chunk_size=4, left_chunks=16)
    config = read_whale_config(info.path)
    features = config.features
    assert (features.sample_rate, features.num_mel_bins) == (16000, 80)
    assert (features.frame_length_ms, features.frame_shift_ms, features.dither) == (25, 10, 1.0)
    adapter = config.adapter
    assert (adapter.kind, adapter.kernel_size, adapter.norm, adapter.activation) == ("subsampling", 3, "batch", "relu")
    assert (adapter.enc_out_dim, adapter.llm_embed_dim) == (24, 48)
    encoder = config.encoder
    assert (encoder.hidden_size, encoder.num_blocks, encoder.num_heads, encoder.ffn_size) == (24, 3, 6, 40)
    assert (encoder.pos_enc, encoder.chunk_size, encoder.left_chunks) == ("rel-enc", 4, 16)


VARIANTS = {
    "rel-enc": {},
    "abs-enc": dict(pos_enc="abs-enc"),
    "subsampling-batch": dict(norm="batch"),
    "cnn": dict(adapter_type="cnn"),
    "linear": dict(adapter_type="linear"),
    "prompt": dict(prompt_num=5),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_parameters_are_final_pt_key_for_key(tmp_path, variant):
    info = write_vita_audio_encoder(tmp_path, **VARIANTS[variant])
    parts = load_whale_folder(info.path)
    for module, prefix in ((parts.encoder, "encoder."), (parts.adapter, "adpter.")):
        ours = module.state_dict()
        saved = {k[len(prefix):]: v for k, v in info.state.items() if k.startswith(prefix)}
        assert set(ours) == set(saved), (prefix, set(ours) ^ set(saved))
        for key, value in saved.items():
            assert ours[key].shape == value.shape, prefix + key
            assert torch.equal(ours[key], value), prefix + key
    if info.prompt_num:
        assert set(parts.prompt_state) == {"weight"}
        assert torch.equal(parts.prompt_state["weight"], info.state["prompt_embeddings.weight"])
    else:
        assert parts.prompt_state is None
    assert parts.adapter.time_stride == (2 if info.adapter_type == "subsampling" else 1)


FORWARD = {
    "rel-enc full attention": {},
    "rel-enc chunks 4 left 2": dict(chunk_size=4, left_chunks=2),
    "rel-enc chunks 4 left -1": dict(chunk_size=4, left_chunks=-1),
    "abs-enc": dict(pos_enc="abs-enc"),
    "subsampling layer norm relu k3": dict(activation="relu", kernel_size=3),
    "subsampling batch norm": dict(norm="batch"),
    "cnn": dict(adapter_type="cnn"),
    "linear": dict(adapter_type="linear"),
    "final.pt cmvn overrides global_cmvn": dict(checkpoint_cmvn="other"),
}


@pytest.mark.parametrize("case", FORWARD)
def test_forward_equals_vitas_on_a_padded_batch(tmp_path, case):
    info = write_vita_audio_encoder(tmp_path, **FORWARD[case])
    parts = load_whale_folder(info.path)
    parts.encoder.eval()
    parts.adapter.eval()
    lengths = torch.tensor(LENGTHS)
    features = _features(info, LENGTHS)
    states, out_lengths, embeds = _vitacore(parts, features, lengths)
    ref_states, mask4, ref_embeds, out_mask = _reference(info, features, lengths)
    assert states.shape == ref_states.shape and embeds.shape == ref_embeds.shape, case
    assert out_lengths.tolist() == mask4.sum(1).tolist()
    assert _max_diff(states, ref_states, mask4) < 1e-5, case
    assert _max_diff(embeds, ref_embeds, out_mask) < 1e-5, case
    assert ref_embeds[out_mask].abs().max() > 0.5  # the comparison is not of near-zero values


@pytest.mark.parametrize("case", ["rel-enc full attention", "rel-enc chunks 4 left 2", "abs-enc", "cnn"])
def test_padded_batch_equals_single_clips(tmp_path, case):
    info = write_vita_audio_encoder(tmp_path, **FORWARD[case])
    parts = load_whale_folder(info.path)
    parts.encoder.eval()
    parts.adapter.eval()
    features = _features(info, LENGTHS, seed=1)
    _, out_lengths, embeds = _vitacore(parts, features, torch.tensor(LENGTHS))
    stride = parts.adapter.time_stride
    for i, n in enumerate(LENGTHS):
        _, alone_lengths, alone = _vitacore(parts, features[i:i + 1, :n], torch.tensor([n]))
        tokens = _vita_tokens(n, info.adapter_type)
        assert alone.shape[1] == tokens == math.ceil(int(out_lengths[i]) / stride), (case, n)
        assert int(alone_lengths[0]) == int(out_lengths[i])
        assert (embeds[i, :tokens] - alone[0]).abs().max().item() < 5e-6, (case, n)


@pytest.mark.parametrize("adapter_type", ["subsampling", "cnn"])
def test_output_lengths_follow_vitas_mask_arithmetic(tmp_path, adapter_type):
    info = write_vita_audio_encoder(tmp_path, num_blocks=1, adapter_type=adapter_type)
    parts = load_whale_folder(info.path)
    parts.encoder.eval()
    lengths = list(range(7, 72))
    features = _features(info, lengths)
    _, out_lengths, embeds = _vitacore(parts, features, torch.tensor(lengths))
    mask = (torch.arange(max(lengths)).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)).unsqueeze(1)
    mask4 = mask[:, :, 2::2][:, :, 2::2]  # VITA's Conv2dSubsampling4 mask
    assert out_lengths.tolist() == mask4.squeeze(1).sum(1).tolist()
    assert torch.equal(mask4.squeeze(1), subsampled_mask(mask.squeeze(1)))
    out_mask = mask4[:, :, 0::2] if adapter_type == "subsampling" else mask4
    assert embeds.shape[1] == out_mask.shape[2]
    stride = parts.adapter.time_stride
    for n, count, vita_count in zip(lengths, out_lengths.tolist(), out_mask.squeeze(1).sum(1).tolist()):
        assert math.ceil(count / stride) == vita_count == _vita_tokens(n, adapter_type), n


def _degenerate_stats(info):
    """The folder's statistics with bin 3 at zero variance and bin 5 at a negative one (both floored at 1e-20)."""
    mean_stat, var_stat, frame_num = (list(info.cmvn_stats[0]), list(info.cmvn_stats[1]), info.cmvn_stats[2])
    mean_stat[3], var_stat[3] = 7.0 * frame_num, 49.0 * frame_num
    mean_stat[5], var_stat[5] = 3.0 * frame_num, 9.0 * frame_num - 1.0
    return mean_stat, var_stat, frame_num


@pytest.mark.parametrize("fmt", ["json", "kaldi"])
def test_cmvn_file_gives_vitas_mean_and_istd(tmp_path, fmt):
    info = write_vita_audio_encoder(tmp_path, cmvn_format=fmt, checkpoint_cmvn="none")
    stats = _degenerate_stats(info)
    write_cmvn(info.cmvn_path, *stats, fmt=fmt)
    mean, istd = vita_cmvn(*stats)
    assert istd[3] == istd[5] == 1e10  # 1 / sqrt(1e-20)
    buffers = load_whale_folder(info.path).encoder.state_dict()
    torch.testing.assert_close(buffers["global_cmvn.mean"], mean, rtol=1e-6, atol=0)
    torch.testing.assert_close(buffers["global_cmvn.istd"], istd, rtol=1e-6, atol=0)


def test_final_pt_cmvn_overrides_the_file(tmp_path):
    info = write_vita_audio_encoder(tmp_path, checkpoint_cmvn="other")
    file_mean, file_istd = vita_cmvn(*info.cmvn_stats)
    buffers = load_whale_folder(info.path).encoder.state_dict()
    assert torch.equal(buffers["global_cmvn.mean"], info.state["encoder.global_cmvn.mean"])
    assert torch.equal(buffers["global_cmvn.istd"], info.state["encoder.global_cmvn.istd"])
    assert not torch.allclose(buffers["global_cmvn.mean"], file_mean)
    assert not torch.allclose(buffers["global_cmvn.istd"], file_istd)


@pytest.mark.parametrize("checkpoint_cmvn", ["none", "file"])
def test_kaldi_binary_cmvn_is_refused(tmp_path, checkpoint_cmvn):
    """VITA reads global_cmvn before final.pt and stops on a binary Kaldi file, whatever final.pt holds."""
    info = write_vita_audio_encoder(tmp_path, cmvn_format="kaldi", checkpoint_cmvn=checkpoint_cmvn)
    write_cmvn(info.cmvn_path, *info.cmvn_stats, fmt="kaldi-binary")
    with pytest.raises(ValueError, match=r"(?i)binary") as err:
        load_whale_folder(info.path)
    assert info.cmvn_path in str(err.value)


CHECKPOINT_ERRORS = {
    "missing": dict(drop_keys=("encoder.enc.1.encoders.1.feed_forward.w_2.bias",)),
    "missing adapter": dict(drop_keys=("adpter.bn2.weight",)),
    "unexpected block": dict(extra_keys={"encoder.enc.1.encoders.2.norm1.weight": torch.ones(32)}),
    "unexpected batch-norm stats": dict(extra_keys={"adpter.bn2.running_mean": torch.zeros(64)}),
    "unexpected prefix": dict(extra_keys={"model.audio_encoder.encoder.enc.1.after_norm.weight": torch.ones(32)}),
    "mis-shaped encoder": dict(extra_keys={"encoder.enc.1.encoders.1.feed_forward.w_1.weight": torch.ones(64, 33)}),
    "mis-shaped adapter": dict(extra_keys={"adpter.project.weight": torch.ones(64, 65)}),
}


@pytest.mark.parametrize("case", CHECKPOINT_ERRORS)
def test_checkpoint_that_does_not_fit_is_refused_naming_key_and_file(tmp_path, case):
    kwargs = CHECKPOINT_ERRORS[case]
    info = write_vita_audio_encoder(tmp_path, **kwargs)
    (key,) = kwargs.get("drop_keys") or tuple(kwargs["extra_keys"])
    with pytest.raises(ValueError) as err:
        load_whale_folder(info.path)
    assert key in str(err.value), (case, str(err.value))
    assert info.checkpoint_path in str(err.value), (case, str(err.value))


YAML_ERRORS = {
    "mamba component": ({"encoder_conf.overview_conf.encoder-layer-config": "subsampling-mamba"},
                        r"encoder-layer-config"),
    "three components": ({"encoder_conf.overview_conf.encoder-layer-config": "subsampling-transformer-transformer"},
                         r"encoder-layer-config"),
    "unknown positional encoding": ({TRANSFORMER + "transformer-pos-enc-class": "xyz"}, r"transformer-pos-enc-class"),
    "subsampling rate 6": ({SUBSAMPLING + "subsampling-rate": 6}, r"subsampling-rate"),
    "audio bos/eos": ({"model_conf.add_audio_bos_eos": True}, r"add_audio_bos_eos"),
    "unknown adapter": ({"model_conf.adpter_type": "xyz"}, r"adpter_type"),
    "unknown adapter norm": ({"model_conf.norm": "group"}, r"\bnorm\b"),
    "model_conf key VITA rejects": ({"model_conf.llm_head_num": 28}, r"llm_head_num"),
    "dims that do not chain": ({SUBSAMPLING + "subsampling-input-dim": 40},
                               r"subsampling-input-dim|encoder-input-dim"),
    "missing num_mel_bins": ({"dataset_conf.fbank_conf.num_mel_bins": DELETE}, r"num_mel_bins"),
    "missing resample_conf": ({"dataset_conf.resample_conf": DELETE}, r"resample_(conf|rate)"),
    "missing dither": ({"dataset_conf.fbank_conf.dither": DELETE}, r"dither"),
}


@pytest.mark.parametrize("case", YAML_ERRORS)
def test_unsupported_or_missing_yaml_settings_are_refused_naming_the_field(tmp_path, case):
    """What VITA cannot run: unknown components / classes, broken flags, model_conf keys its audioEncoder does not
    take, dims that do not chain (its sys.exit), and the dataset_conf keys its processor indexes (KeyError)."""
    changes, field = YAML_ERRORS[case]
    info = write_vita_audio_encoder(tmp_path)
    edit_yaml(info.path, changes)
    with pytest.raises(ValueError, match=field) as err:
        read_whale_config(info.path)
    assert "train.yaml" in str(err.value), str(err.value)


def test_released_freeze_omni_model_conf_is_not_vitas(tmp_path):
    """Freeze-Omni's model_conf has keys VITA's audioEncoder(**model_conf) does not take (a TypeError in VITA)."""
    info = write_vita_audio_encoder(tmp_path, layout="freeze-omni")
    names = r"add_audio_bos_eos|add_prompt_before|chunk_size|llm_head_num|num_key_value_heads|predict_usr_state|"
    with pytest.raises(ValueError, match=names + r"prompt_finetune|prompt_num"):
        read_whale_config(info.path)


def test_adapter_made_for_another_llm_is_refused(tmp_path):
    info = write_vita_audio_encoder(tmp_path, llm_embed_dim=64)
    assert load_whale_folder(info.path, llm_hidden_size=64).adapter.state_dict()["project.weight"].shape == (64, 64)
    with pytest.raises(ValueError, match="llm_embed_dim"):
        load_whale_folder(info.path, llm_hidden_size=96)


def test_dynamic_chunks_attend_over_the_whole_clip_every_call(tmp_path, vitacore_log):
    """VITA draws a random chunk per call under dynamic chunks; vitacore documents and uses full attention,
    which equals VITA's output whenever its draw exceeds half the clip (its full-attention branch)."""
    info = write_vita_audio_encoder(tmp_path, dynamic_chunks=True, chunk_size=4, left_chunks=2)
    parts = load_whale_folder(info.path)
    assert "dynamic chunks" in vitacore_log.text
    parts.encoder.eval()
    parts.adapter.eval()
    lengths = torch.tensor(LENGTHS)
    features = _features(info, LENGTHS)
    first = _vitacore(parts, features, lengths)
    again = _vitacore(parts, features, lengths)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    ref_states, mask4, ref_embeds, out_mask = _reference(info, features, lengths, chunk_size=-1, left_chunks=-1)
    assert _max_diff(first[0], ref_states, mask4) < 1e-5
    assert _max_diff(first[2], ref_embeds, out_mask) < 1e-5
