"""bench/data_loader.py runs end to end with tiny settings and prints every figure it promises."""

import importlib.util
import os
import re
import sys

import pytest

PATH = os.path.join(os.path.dirname(__file__), "..", "..", "bench", "data_loader.py")


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_data_loader", PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def test_data_loader_bench_smoke(bench, vitacore_cache, dist, capsys):
    assert bench.main(["--batches", "2", "--steps", "1", "--warmup", "1", "--rounds", "1", "--batch_size", "2"]) == 0
    out = capsys.readouterr().out
    for line in ("samples/s, 0 workers", "samples/s, 2 workers", "ratio 2 workers / 0 workers",
                 "ratio data time per batch / training step time"):
        assert re.search(re.escape(line) + r".*\d", out), line


def test_bad_counts_are_refused(bench):
    with pytest.raises(SystemExit):
        bench.parse(["--workers", "0"])
