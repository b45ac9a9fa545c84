"""Tests for generation-based evaluation (vitacore.engine.evaluation): scores, rank shares, padding."""

import pytest
import torch
from tiny_models import build_tiny_vita

from vitacore.constants import IGNORE_INDEX
from vitacore.data.prompts import PromptCollator, PromptSample
from vitacore.engine import LoopConfig
from vitacore.engine.distributed import DistInfo
from vitacore.engine.evaluation import GenerationEval, evaluate_generation, exact_match, token_f1

PAD, STOP = 0, 63


def test_exact_match_normalizes_whitespace_only():
    assert exact_match(" a  red\ncircle ", "a red circle") == 1.0
    assert exact_match("a red circle", "a Red circle") == 0.0
    assert exact_match("", "") == 1.0


@pytest.mark.parametrize("prediction, reference, f1", [
    ("a red circle", "a red circle", 1.0),
    ("a red square", "a red circle", 2 / 3),             # 2 of 3 words each way
    ("red", "a red circle", 0.5),                        # precision 1, recall 1/3
    ("a a a", "a red circle", 1 / 3),                    # one common "a": precision 1/3, recall 1/3
    ("blue", "a red circle", 0.0),
    ("", "a red circle", 0.0),
    ("", "", 1.0),
])
def test_token_f1_is_squads(prediction, reference, f1):
    assert token_f1(prediction, reference) == pytest.approx(f1)


def _words(ids):
    """A decoder for the tiny vocabulary: each id is a word; the stop token ends the answer."""
    ids = list(ids)
    return " ".join(str(i) for i in (ids[: ids.index(STOP)] if STOP in ids else ids))


@pytest.fixture(scope="module")
def scored():
    """A tiny model, three prompts, and references chosen from its own greedy answers: right, half right, wrong."""
    model = build_tiny_vita().eval()
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12], [13, 14]]
    answers = [model.generate(torch.tensor([p]), max_new_tokens=4, eos_token_id=STOP, pad_token_id=PAD)[0]
               for p in prompts]
    texts = [_words(a) for a in answers]
    references = [texts[0], " ".join(texts[1].split()[:2] + ["99", "98"]), "nothing like it"]
    samples = [PromptSample(f"s{i}", p, [IGNORE_INDEX] * len(p), [], [], [], "lang", reference=r)
               for i, (p, r) in enumerate(zip(prompts, references))]
    generation = GenerationEval(samples, PromptCollator(PAD), _words, max_new_tokens=4, eos_token_id=[STOP],
                                pad_token_id=PAD)
    expected = [(exact_match(t, r), token_f1(t, r)) for t, r in zip(texts, references)]
    return model, generation, expected


def test_one_rank_scores_every_prompt(scored, dist):
    model, generation, expected = scored
    row = evaluate_generation(model, generation, LoopConfig(per_device_eval_batch_size=2), dist)
    assert expected[0] == (1.0, 1.0) and expected[2] == (0.0, 0.0) and 0 < expected[1][1] < 1
    assert row["eval_generate_exact_match"] == pytest.approx(1 / 3)
    assert row["eval_generate_f1"] == pytest.approx(sum(f for _, f in expected) / 3)


def test_a_rank_counts_only_its_own_share_and_not_its_padding(scored, dist):
    """Rank 1 of 2 owns prompt 1 only, padded to rank 0's two prompts with a repeat that is not counted.

    The one-process group stands in for the job: its all_reduce leaves this rank's sums as they are.
    """
    model, generation, expected = scored
    rank1 = DistInfo(rank=1, world_size=2, local_rank=1, device=dist.device)
    row = evaluate_generation(model, generation, LoopConfig(per_device_eval_batch_size=1), rank1)
    assert row["eval_generate_exact_match"] == expected[1][0]
    assert row["eval_generate_f1"] == pytest.approx(expected[1][1])
