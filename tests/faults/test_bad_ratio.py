"""``--max_bad_sample_ratio`` applies only after ``--min_samples_for_bad_ratio`` samples (default 200), at
load and during training, so one early bad record does not stop a large run."""

import json
import time

import pytest
from PIL import Image

from vitacore.config import parse_args
from vitacore.data import DataSpec, ModelInputs, build_data
from vitacore.data.bad_samples import BadSampleLog
from vitacore.data.sampler import ResumableSampler
from vitacore.demo.tokenizer import build_tokenizer


def _record(i, image="red.png"):
    return {"id": f"r{i}", "image": image, "conversations": [{"from": "human", "value": f"<image>\nq {i}"},
                                                               {"from": "gpt", "value": f"a {i}"}]}


def test_one_bad_record_in_the_first_batch_of_1000_finishes_and_is_counted(tmp_path, vitacore_cache, capsys):
    """Setup: recipe_main on the embedded default (stage 1, default ratio 0.01 and minimum 200), 1,000 image
    records, the first one the sampler draws has a missing image; 2 steps of 4 samples, a metrics row per step.
    Expect: exit 0 and metrics.jsonl counts 1 bad sample (before: 1 of 4 seen > 1%, the run stopped at step 1)."""
    from vitacore.recipes import recipe_main

    Image.new("RGB", (32, 32), (200, 10, 10)).save(tmp_path / "red.png")
    records = [_record(i) for i in range(1000)]
    first = next(iter(ResumableSampler(records, num_replicas=1, rank=0, seed=42)))  # --seed 42: drawn first
    records[first] = _record(first, image="missing.png")
    (tmp_path / "train.json").write_text(json.dumps(records))
    out = tmp_path / "out"
    started = time.monotonic()
    code = recipe_main(["--data_path", str(tmp_path / "train.json"), "--max_steps", "2", "--logging_steps", "1",
                        "--per_device_train_batch_size", "4", "--group_by_modality_length", "False",
                        "--output_dir", str(out)])
    elapsed = time.monotonic() - started
    assert code == 0, capsys.readouterr().err
    with open(out / "metrics.jsonl") as fh:
        rows = [json.loads(line) for line in fh if '"loss"' in line]
    assert [row["bad_samples"] for row in rows] == [1, 0]
    assert elapsed < 120


def test_training_ratio_waits_for_the_minimum_then_applies():
    """Setup: BadSampleLog with ratio 0.01 and the default minimum (200): 1 bad among the first 4, then more.
    Expect: no stop before 200 samples were seen; past them, 3 of 204 (1.5%) stops naming the flag
    (before: 1 of 4 stopped the run)."""
    log = BadSampleLog(0.01)
    log.add(1, 4)
    log.add(0, 100)
    log.add(1, 50)  # 2 of 154: still under the minimum
    with pytest.raises(ValueError, match=r"3 of the 204 training samples .*--max_bad_sample_ratio 0.01"):
        log.add(1, 50)


def test_load_ratio_waits_for_the_minimum_then_applies(tmp_path):
    """Setup: files with 1 malformed record among 20 (5%), and 10 among 300 (3.3%), default flags.
    Expect: the small file builds (1 dropped); the large one stops naming --max_bad_sample_ratio
    (before: the small file stopped the run too)."""
    tok = build_tokenizer()
    bad = {"id": "bad", "conversations": [{"from": "gpt", "value": "only an answer"}]}
    text = [{"id": f"t{i}", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
            for i in range(300)]
    small = tmp_path / "small.json"
    small.write_text(json.dumps(text[:19] + [bad]))
    assert len(build_data(DataSpec(data_path=str(small)), tok, ModelInputs()).train.rejected) == 1
    large = tmp_path / "large.json"
    large.write_text(json.dumps(text[:290] + [bad] * 10))
    with pytest.raises(ValueError, match=r"10 of 300 records break .*--max_bad_sample_ratio 0.01"):
        build_data(DataSpec(data_path=str(large)), tok, ModelInputs())


def test_the_minimum_is_a_flag_wired_to_the_loop_and_the_data():
    """Setup: --min_samples_for_bad_ratio 50 through the run's derived specs.
    Expect: the loop (training count) and the data (load count) both get 50; the default is 200."""
    from vitacore.demo import SyntheticSelection
    from vitacore.recipes.specs import data_spec, loop_config

    config = parse_args(["--min_samples_for_bad_ratio", "50"])
    assert loop_config(config).min_samples_for_bad_ratio == 50
    assert data_spec(config, None, SyntheticSelection(("a",), "b")).min_samples_for_bad_ratio == 50
    assert parse_args([]).data.min_samples_for_bad_ratio == 200
