"""bench/long_context.py and its tensor-memory tracker (bench/tensor_memory.py), at tiny sizes."""

import contextlib
import importlib.util
import os
import re
import sys

import pytest
import torch
from torch._subclasses.fake_tensor import DataDependentOutputException

PATH = os.path.join(os.path.dirname(__file__), "..", "..", "bench", "long_context.py")
TINY = ["--vocab", "2048", "--hidden", "16", "--layers", "1", "--chunk", "64"]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_long_context", PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    import tensor_memory  # on sys.path once long_context.py is loaded

    module.tensor_memory = tensor_memory
    yield module
    sys.modules.pop(spec.name, None)


@pytest.mark.parametrize("fake", [False, True], ids=["real", "fake"])
def test_tracker_counts_a_known_op_sequence(bench, fake):
    """Setup: under the tracker (on real, then on fake tensors): a 1000-float tensor, a 2000-float one,
    the first freed, an in-place op on a view of the second, a sum, a logsumexp over a temporary
    10x300 tensor. Expect: the peak and live bytes counted by hand, logsumexp's scratch included."""
    memory = bench.tensor_memory
    with memory.fake_tensors() if fake else contextlib.nullcontext(), memory.LiveTensorBytes() as tracker:
        x = torch.ones(1000)
        y = torch.ones(2000)
        assert (tracker.live, tracker.peak) == (12000, 12000)
        del x
        y[10:].mul_(2)  # a view and an in-place op: no new storage
        total = y.sum()
        assert (tracker.live, tracker.peak) == (8004, 12000)
        result = torch.logsumexp(torch.ones(10, 300), dim=1)
    assert total.shape == () and result.shape == (10,)
    # 8004 + 12000 (the 10x300 input) + 40 (the output) + 12000 (logsumexp's temporary exp(x - max))
    assert tracker.peak == 32044
    assert tracker.live == 8044  # the input freed once the call returned


def test_fake_tensors_answer_data_dependent_ops(bench):
    """Setup: fake tensors with a real-valued integer mask [1, 0, 1, 1]; then an integer tensor written
    in part from a fake float tensor. Expect: nonzero, boolean-mask indexing and int() follow the mask's
    values; the written tensor's value is unknown afterwards, so int() of its sum refuses."""
    real_mask, real_ints = torch.tensor([1, 0, 1, 1]), torch.tensor([1, 2, 3])
    with bench.tensor_memory.fake_tensors() as keeper:
        mask = keeper.from_real(real_mask)
        floats = torch.zeros(4, 8)
        assert torch.nonzero(mask).shape == (3, 1)
        assert floats[mask.bool()].shape == (3, 8)
        assert int(mask.sum()) == 3
        written = keeper.from_real(real_ints)
        written[:2].copy_(floats[0, :2].long())
        with pytest.raises(DataDependentOutputException):
            int(written.sum())


def test_fake_step_matches_real_step_and_chunked_is_lower(bench):
    """Setup: one training step of the bench's model (vocab 2048, hidden 16, 256 tokens, all supervised),
    each path on fake tensors and on real ones. Expect: the same bytes before and at the peak on both;
    the plain path holds at least three logits-sized tensors at once; the chunked path's peak is lower."""
    args = bench.parse(["--lengths", "256", *TINY])
    figures = {}
    for path in bench.PATHS:
        fake = bench.fake_case(args, 256, "all", path)
        real = bench.tracked_step(bench.build_model(args, 256, path), bench.make_batch(256, "all", args.vocab))
        assert fake["before"] == real["before"]
        assert abs(fake["peak"] - real["peak"]) <= 64, path
        figures[path] = fake
    logits_bytes = 256 * 2048 * 4
    assert bench.growth(figures["plain"]) >= 3 * logits_bytes
    assert figures["chunked"]["peak"] < figures["plain"]["peak"]


def test_real_case_process_and_report(bench, capsys):
    """Setup: the bench's worker process for one real case (chunked, 128 tokens), then the report of
    fake figures at 64 and 128 tokens with it. Expect: the worker's tracker equals the fake one, its
    resident growth is positive; the report prints the cross-check row and the ratio at 128 tokens."""
    args = bench.parse(["--lengths", "64,128", "--layouts", "all", *TINY])
    fake = {(n, "all", p): bench.fake_case(args, n, "all", p) for n in args.lengths for p in bench.PATHS}
    real = {(128, "all", "chunked"): bench.spawn_real_case(args, 128, "all", "chunked")}
    assert real[(128, "all", "chunked")]["peak"] == fake[(128, "all", "chunked")]["peak"]
    assert real[(128, "all", "chunked")]["rss_growth"] > 0
    ratios = bench.report(args, fake, real)
    out = capsys.readouterr().out
    assert re.search(r"128:all:chunked +[\d.]+ +[\d.]+ +[\d.]+ +[\d.]+ +1\.0000", out)
    assert f"ratio chunked/plain step peak at 128 tokens (all): {ratios[('all', 128)]:.3f}" in out
    assert 0 < ratios[("all", 128)] < 1


def test_bad_flags_are_refused(bench):
    """Setup: a non-numeric length, no length, an unknown layout. Expect: argparse exits; by default the
    real runs are at the shortest and longest lengths."""
    assert bench.parse(["--lengths", "8,4,16"]).real_lengths == {4, 16}
    for argv in (["--lengths", "4k"], ["--lengths", ","], ["--layouts", "all,half"], ["--real_lengths", "x"]):
        with pytest.raises(SystemExit):
            bench.parse(argv)
