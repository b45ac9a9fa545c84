"""Tests for vitacore.model.merge.merge_media_embeddings.

Expected tensors are assembled by hand from the embedding table and the feature blocks.
"""

import pytest
import torch
import torch.nn as nn

from vitacore.constants import AUDIO_TOKEN_INDEX as AUD
from vitacore.constants import IGNORE_INDEX as IGN
from vitacore.constants import IMAGE_TOKEN_INDEX as IMG
from vitacore.model.merge import merge_media_embeddings

HIDDEN = 4
PAD = 0


@pytest.fixture
def embed():
    torch.manual_seed(0)
    return nn.Embedding(32, HIDDEN)


def _blocks(*sizes, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(n, HIDDEN, generator=gen) for n in sizes]


def _e(embed, *ids):
    return embed.weight[list(ids)].detach()


def _merge(embed, ids, labels, mask, images=(), audios=(), max_length=64, **kw):
    with torch.no_grad():
        return merge_media_embeddings(
            torch.tensor(ids), torch.tensor(labels), torch.tensor(mask), embed,
            list(images), list(audios), max_length, **kw,
        )


def test_blocks_land_at_placeholder_offsets_and_rows_are_right_padded(embed):
    ids = [[5, IMG, 6, 7], [8, AUD, 9, PAD]]
    labels = [[IGN, IGN, 6, 7], [IGN, IGN, 9, IGN]]
    mask = [[1, 1, 1, 1], [1, 1, 1, 0]]
    (image,) = _blocks(3, seed=1)
    (audio,) = _blocks(2, seed=2)
    out = _merge(embed, ids, labels, mask, [image], [audio])

    row0 = torch.cat([_e(embed, 5), image, _e(embed, 6, 7)])
    row1 = torch.cat([_e(embed, 8), audio, _e(embed, 9), torch.zeros(2, HIDDEN)])
    torch.testing.assert_close(out.inputs_embeds, torch.stack([row0, row1]))
    assert out.labels.tolist() == [
        [IGN, IGN, IGN, IGN, 6, 7],
        [IGN, IGN, IGN, 9, IGN, IGN],
    ]
    assert out.attention_mask.tolist() == [[1] * 6, [1, 1, 1, 1, 0, 0]]
    assert out.position_ids.tolist() == [[0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 0, 0]]
    assert out.num_truncated_rows == 0


def test_feature_positions_get_ignore_labels_even_if_input_label_was_set(embed):
    # a (nonsensical) label on the placeholder itself must not leak into the block positions
    ids = [[3, IMG, 4]]
    labels = [[3, 99, 4]]
    mask = [[1, 1, 1]]
    out = _merge(embed, ids, labels, mask, _blocks(2))
    assert out.labels.tolist() == [[3, IGN, IGN, 4]]


def test_left_padding_side_pads_on_the_left(embed):
    ids = [[5, IMG, 6, 7], [8, AUD, 9, PAD]]
    labels = [[IGN, IGN, 6, 7], [IGN, IGN, 9, IGN]]
    mask = [[1, 1, 1, 1], [1, 1, 1, 0]]
    (image,) = _blocks(3, seed=1)
    (audio,) = _blocks(2, seed=2)
    out = _merge(embed, ids, labels, mask, [image], [audio], padding_side="left")

    row1 = torch.cat([torch.zeros(2, HIDDEN), _e(embed, 8), audio, _e(embed, 9)])
    torch.testing.assert_close(out.inputs_embeds[1], row1)
    assert out.labels[1].tolist() == [IGN, IGN, IGN, IGN, IGN, 9]
    assert out.attention_mask.tolist() == [[1] * 6, [0, 0, 1, 1, 1, 1]]
    assert out.position_ids[1].tolist() == [0, 0, 0, 1, 2, 3]
    assert out.position_ids[0].tolist() == list(range(6))


def test_padding_is_removed_before_splicing(embed):
    # left-padded input; the pad ids must not appear in the merged row
    ids = [[PAD, PAD, 5, IMG, 6], [7, IMG, 8, 9, 10]]
    labels = [[IGN, IGN, IGN, IGN, 6], [IGN, IGN, 8, 9, 10]]
    mask = [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]
    blocks = _blocks(2, 2)
    out = _merge(embed, ids, labels, mask, blocks)
    row0 = torch.cat([_e(embed, 5), blocks[0], _e(embed, 6), torch.zeros(2, HIDDEN)])
    row1 = torch.cat([_e(embed, 7), blocks[1], _e(embed, 8, 9, 10)])
    torch.testing.assert_close(out.inputs_embeds, torch.stack([row0, row1]))
    assert out.attention_mask.tolist() == [[1, 1, 1, 1, 0, 0], [1] * 6]
    assert out.labels[0].tolist() == [IGN, IGN, IGN, 6, IGN, IGN]


def test_blocks_are_consumed_in_row_major_order(embed):
    ids = [[IMG, 4, IMG, AUD], [AUD, IMG, 5, PAD]]
    labels = [[IGN, 4, IGN, IGN], [IGN, IGN, 5, IGN]]
    mask = [[1, 1, 1, 1], [1, 1, 1, 0]]
    images = _blocks(1, 2, 3, seed=3)
    audios = _blocks(2, 1, seed=4)
    out = _merge(embed, ids, labels, mask, images, audios)
    row0 = torch.cat([images[0], _e(embed, 4), images[1], audios[0]])
    row1 = torch.cat([audios[1], images[2], _e(embed, 5)])
    assert row0.shape[0] == 6 and row1.shape[0] == 5
    torch.testing.assert_close(out.inputs_embeds[0], row0)
    torch.testing.assert_close(out.inputs_embeds[1, :5], row1)
    assert out.labels.tolist() == [[IGN, 4, IGN, IGN, IGN, IGN], [IGN, IGN, IGN, IGN, 5, IGN]]


def test_text_only_batch_equals_plain_embedding(embed):
    ids = [[1, 2, 3], [4, 5, PAD]]
    labels = [[1, 2, 3], [4, 5, IGN]]
    mask = [[1, 1, 1], [1, 1, 0]]
    out = _merge(embed, ids, labels, mask)
    expected = embed(torch.tensor(ids)).detach() * torch.tensor(mask)[..., None]
    torch.testing.assert_close(out.inputs_embeds, expected)
    assert out.labels.tolist() == labels
    assert out.attention_mask.tolist() == mask


def test_truncation_inside_text_cuts_at_max_length(embed):
    ids = [[5, 6, IMG, 7, 8], [9, PAD, PAD, PAD, PAD]]
    labels = [[IGN, IGN, IGN, 7, 8], [9, IGN, IGN, IGN, IGN]]
    mask = [[1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    (image,) = _blocks(3)
    out = _merge(embed, ids, labels, mask, [image], max_length=6)
    expected = torch.cat([_e(embed, 5, 6), image, _e(embed, 7)])
    torch.testing.assert_close(out.inputs_embeds[0], expected)
    assert out.inputs_embeds.shape[1] == 6
    assert out.labels[0].tolist() == [IGN] * 5 + [7]
    assert out.num_truncated_rows == 1


def test_truncation_never_cuts_through_a_media_block(embed):
    # expanded row: 5 6 [I I I] 7  (length 6); max_length 4 falls inside the block
    ids = [[5, 6, IMG, 7], [9, 10, 11, PAD]]
    labels = [[5, 6, IGN, 7], [9, 10, 11, IGN]]
    mask = [[1, 1, 1, 1], [1, 1, 1, 0]]
    (image,) = _blocks(3)
    out = _merge(embed, ids, labels, mask, [image], max_length=4)
    # row 0 is cut right before the block; row 1 (3 tokens) is untouched
    assert out.attention_mask.tolist() == [[1, 1, 0], [1, 1, 1]]
    torch.testing.assert_close(out.inputs_embeds[0, :2], _e(embed, 5, 6))
    torch.testing.assert_close(out.inputs_embeds[1], _e(embed, 9, 10, 11))
    assert out.labels.tolist() == [[5, 6, IGN], [9, 10, 11]]
    assert out.num_truncated_rows == 1
    # nothing of the image block survives anywhere
    for row in out.inputs_embeds:
        for vec in row:
            assert not any(torch.allclose(vec, b) for b in image)


def test_truncation_exactly_at_block_end_keeps_the_block(embed):
    ids = [[5, IMG, 7, 8]]
    labels = [[5, IGN, 7, 8]]
    mask = [[1, 1, 1, 1]]
    (image,) = _blocks(2)
    out = _merge(embed, ids, labels, mask, [image], max_length=3)
    torch.testing.assert_close(out.inputs_embeds[0], torch.cat([_e(embed, 5), image]))
    assert out.num_truncated_rows == 1


def test_num_truncated_rows_counts_every_long_row(embed):
    # rows 0 and 1 expand to 6 positions (> 5); row 2 stays at 3
    ids = [[1, IMG, 2], [3, IMG, 4], [5, 6, 7]]
    labels = [[1, IGN, 2], [3, IGN, 4], [5, 6, 7]]
    mask = [[1, 1, 1]] * 3
    out = _merge(embed, ids, labels, mask, _blocks(4, 4), max_length=5)
    assert out.num_truncated_rows == 2
    assert out.attention_mask.tolist() == [[1] * 5, [1] * 5, [1, 1, 1, 0, 0]]
    assert out.labels.tolist() == [[1] + [IGN] * 4, [3] + [IGN] * 4, [5, 6, 7, IGN, IGN]]


def test_count_mismatch_raises_naming_the_sample(embed):
    ids = [[1, IMG, 2], [3, 4, 5]]
    labels = [[IGN] * 3] * 2
    mask = [[1] * 3] * 2
    with pytest.raises(ValueError) as err:
        _merge(embed, ids, labels, mask, [], [], sample_ids=["rec-a", "rec-b"])
    assert "rec-a" in str(err.value)
    with pytest.raises(ValueError, match="rec-b"):
        _merge(embed, [[1, 2, 3], [AUD, 4, 5]], labels, mask, [], _blocks(1, 1), sample_ids=["rec-a", "rec-b"])


def test_mismatch_with_extra_features_raises(embed):
    with pytest.raises(ValueError, match="placeholder"):
        _merge(embed, [[1, IMG]], [[IGN, IGN]], [[1, 1]], _blocks(1, 1))


def test_unknown_negative_id_raises(embed):
    with pytest.raises(ValueError, match="-7"):
        _merge(embed, [[1, -7, 2]], [[IGN] * 3], [[1] * 3], sample_ids=["x"])


def test_gradients_flow_to_features_and_embeddings(embed):
    image = torch.randn(2, HIDDEN, requires_grad=True)
    out = merge_media_embeddings(
        torch.tensor([[3, IMG, 4]]), torch.tensor([[IGN, IGN, 4]]), torch.tensor([[1, 1, 1]]),
        embed, [image], [], 16,
    )
    out.inputs_embeds.sum().backward()
    assert image.grad is not None and torch.all(image.grad == 1)
    used = embed.weight.grad.abs().sum(dim=1) > 0
    assert used.nonzero().flatten().tolist() == [3, 4]


@pytest.mark.parametrize("side", ["right", "left"])
def test_image_only_audio_only_both_and_text_only_rows_in_one_batch(embed, side):
    ids = [[5, IMG, 6, PAD], [7, AUD, PAD, PAD], [IMG, 8, AUD, 9], [10, 11, 12, PAD]]
    labels = [[IGN, IGN, 6, IGN], [IGN, IGN, IGN, IGN], [IGN, 8, IGN, 9], [IGN, 11, 12, IGN]]
    mask = [[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 0]]
    image0, image2 = _blocks(2, 2, seed=3)
    audio1, audio2 = _blocks(3, 1, seed=4)
    out = _merge(embed, ids, labels, mask, [image0, image2], [audio1, audio2], padding_side=side)

    rows = [
        (torch.cat([_e(embed, 5), image0, _e(embed, 6)]), [IGN, IGN, IGN, 6]),
        (torch.cat([_e(embed, 7), audio1]), [IGN, IGN, IGN, IGN]),
        (torch.cat([image2, _e(embed, 8), audio2, _e(embed, 9)]), [IGN, IGN, 8, IGN, 9]),
        (_e(embed, 10, 11, 12), [IGN, 11, 12]),
    ]
    width = max(len(r) for r, _ in rows)
    expected_embeds, expected_labels, expected_mask, expected_positions = [], [], [], []
    for embeds, row_labels in rows:
        pad = width - len(embeds)
        zeros = torch.zeros(pad, HIDDEN)
        expected_embeds.append(torch.cat([embeds, zeros] if side == "right" else [zeros, embeds]))
        positions = list(range(len(embeds)))
        if side == "right":
            expected_labels.append(row_labels + [IGN] * pad)
            expected_mask.append([1] * len(embeds) + [0] * pad)
            expected_positions.append(positions + [0] * pad)
        else:
            expected_labels.append([IGN] * pad + row_labels)
            expected_mask.append([0] * pad + [1] * len(embeds))
            expected_positions.append([0] * pad + positions)
    torch.testing.assert_close(out.inputs_embeds, torch.stack(expected_embeds))
    assert out.labels.tolist() == expected_labels
    assert out.attention_mask.tolist() == expected_mask
    assert out.position_ids.tolist() == expected_positions
