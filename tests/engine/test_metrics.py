"""The metrics row: loss per modality and per dataset, peak memory, data-wait share, eval rows shown."""

import json

import pytest
import torch

from vitacore.engine.metrics import MODALITIES, sample_token_losses
from vitacore.recipes import recipe_main


def test_sample_token_losses_are_the_cross_entropy_of_each_rows_answer_tokens():
    """Setup: random logits, labels with a supervised span in rows 0 and 2 and none in row 1; the model's
    per-position losses and next-token targets made from them as vitacore.model.loss makes them.
    Expect: per row, the summed cross-entropy of its answer tokens (position t predicts t + 1) and their count."""
    from vitacore.model.loss import logits_cross_entropy, next_token_targets

    torch.manual_seed(0)
    logits = torch.randn(3, 6, 11)
    labels = torch.full((3, 6), -100)
    labels[0, 2:5] = torch.tensor([1, 2, 3])
    labels[2, 1:] = torch.tensor([4, 5, 6, 7, 8])  # row 1: no supervised token
    targets = next_token_targets(labels)
    sums, counts = sample_token_losses(logits_cross_entropy(logits, targets).token_losses, targets)
    assert counts == [3, 0, 5]
    for row in (0, 2):
        keep = labels[row, 1:] != -100
        expected = torch.nn.functional.cross_entropy(logits[row, :-1][keep], labels[row, 1:][keep], reduction="sum")
        assert sums[row] == pytest.approx(float(expected), rel=1e-6)
    assert sums[1] == 0.0


def test_packed_rows_report_each_sample_alone():
    """Setup: one packed row holding two samples (segments 1 and 2) and padding, per-position losses 1..8.
    Expect: two entries, each summing only its own supervised positions; the boundary position is not counted."""
    from vitacore.model.loss import next_token_targets

    labels = torch.tensor([[-100, 5, 6, -100, 7, 8, -100, -100]])
    segments = torch.tensor([[1, 1, 1, 2, 2, 2, 0, 0]])
    targets = next_token_targets(labels, segments)
    token_losses = torch.arange(1.0, 9.0)[None]
    sums, counts = sample_token_losses(token_losses * (targets != -100), targets, segments)
    assert counts == [2, 2] and sums == [1.0 + 2.0, 4.0 + 5.0]


@pytest.fixture(scope="module")
def stage4_rows(vitacore_cache, tmp_path_factory):
    from vitacore.engine import init_distributed

    init_distributed()
    from vitacore.demo import ensure_default_assets

    data = ensure_default_assets().data_root
    out = tmp_path_factory.mktemp("metrics") / "stage4"
    # The demo's stage-4 data (image, video, audio and text records) on the embedded default model.
    files = ",".join(f"{data}/{name}.json" for name in MODALITIES)
    assert recipe_main(["--stage", "1", "--data_path", files, "--output_dir", str(out), "--max_steps", "12",
                        "--logging_steps", "4", "--save_steps", "100"]) == 0
    with open(out / "metrics.jsonl") as fh:
        return list(map(json.loads, fh))


def test_per_modality_losses_weigh_back_to_the_loss(stage4_rows):
    train = [row for row in stage4_rows if "loss" in row]
    assert len(train) == 3
    for row in train:
        weighted = sum(row[f"loss_{m}"] * row[f"answer_tokens_{m}"] for m in MODALITIES if row[f"loss_{m}"] is not None)
        tokens = sum(row[f"answer_tokens_{m}"] for m in MODALITIES)
        assert tokens > 0 and abs(weighted / tokens - row["loss"]) < 1e-6, row
        # The demo's stage-4 mix has every modality in each window of 4 steps x 8 samples.
        assert all(row[f"loss_{m}"] is not None and row[f"loss_{m}"] > 0 for m in MODALITIES), row
        # Per dataset: the demo's files are named after their modality.
        for m in MODALITIES:
            assert row[f"loss/{m}"] == pytest.approx(row[f"loss_{m}"], rel=1e-12)


def test_rows_carry_peak_memory_and_data_wait(stage4_rows):
    for row in (r for r in stage4_rows if "loss" in r):
        assert 0.05 < row["peak_memory_gb"] < 24  # the process's peak RSS on CPU, in GiB
        assert 0.0 <= row["data_wait_share"] < 1.0


def test_eval_rows_are_printed_as_they_happen(vitacore_cache, dist, tmp_path, vitacore_log):
    assert recipe_main(["--stage", "1", "--output_dir", str(tmp_path / "run"), "--max_steps", "4",
                        "--eval_steps", "2", "--eval_strategy", "steps"]) == 0
    lines = [line for line in vitacore_log.lines if line.startswith("eval at step 2:")]
    assert lines and "loss" in lines[0] and "accuracy" in lines[0], vitacore_log.text
