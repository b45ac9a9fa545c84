"""The modality-length cache: counted once, read on the next start, counted again when anything that fixes a
length changed or the file is damaged; kept beside the data, in --length_cache_dir, or in the output folder."""

import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

import vitacore
from vitacore.data import DataSpec, ModelInputs, build_data
from vitacore.data.audio import AudioTransform, write_wav
from vitacore.data.conversation import get_template
from vitacore.data.images import ImageSpec
from vitacore.data.length_cache import CACHE_FOLDER, OUTPUT_CACHE_FOLDER, tokenizer_digest
from vitacore.data.lengths import LengthCounter, compute_lengths
from vitacore.data.tiling import ImageTiler
from vitacore.demo.tokenizer import build_tokenizer
from vitacore.recipes.specs import data_spec

INPUTS = ModelInputs(image_spec=ImageSpec(32, (0.5,) * 3, (0.5,) * 3), tokens_per_image=4,
                     audio_transform=AudioTransform())


class CountingTokenizer(type(build_tokenizer())):
    """The demo's real tokenizer, counting its ``encode`` calls (what counting lengths costs)."""

    def encode(self, *args, **kwargs):
        self.num_encodes += 1
        return super().encode(*args, **kwargs)


def _counting(tok=None):
    tok = tok or build_tokenizer()
    tok.__class__ = CountingTokenizer
    tok.num_encodes = 0
    return tok


def _write_data(root, count=36, name="train.json"):
    """``count`` records, a third each text, image (two sizes, so tiling differs) and audio."""
    (root / "media").mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 32), (200, 0, 0)).save(root / "media" / "small.png")
    Image.new("RGB", (96, 32), (0, 200, 0)).save(root / "media" / "wide.png")
    write_wav(str(root / "media" / "tone.wav"), np.zeros(8000, dtype=np.float32), 16000)
    records = []
    for i in range(count):
        words = " ".join(["colour"] * (1 + i % 7))
        record = {"id": f"r{i}", "conversations": [{"from": "human", "value": f"what {words}?"},
                                                  {"from": "gpt", "value": f"answer {i}"}]}
        if i % 3 == 1:
            record["image"] = "media/small.png" if i % 2 else "media/wide.png"
            record["conversations"][0]["value"] = "<image>\n" + record["conversations"][0]["value"]
        elif i % 3 == 2:
            record["audio"] = ["media/tone.wav"]
            record["conversations"][0]["value"] = "<audio>\n" + record["conversations"][0]["value"]
        records.append(record)
    path = root / name
    path.write_text(json.dumps(records))
    return path


def _spec(path, **kwargs):
    return DataSpec(data_path=str(path), max_dynamic_patch=4, **kwargs)


def _cache_files(folder):
    return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


def _lengths(spec, tok, inputs=INPUTS):
    return build_data(spec, tok, inputs).train.modality_lengths


def test_a_second_start_reads_the_cache_and_tokenizes_nothing(tmp_path):
    """Setup: build_data over text, image and audio records, lengths asked for twice (two builds), and once with
    the cache turned off.
    Expect: the first build tokenizes and writes one file beside the data; the second makes no tokenizer call and
    returns the same lengths; counting without a cache gives them too."""
    path = _write_data(tmp_path)
    tok = _counting()
    first = _lengths(_spec(path), tok)
    assert tok.num_encodes > 0 and len(first) == 36 and first.dtype == np.int64
    assert (first[1::3] > 0).all() and (first[0::3] < 0).all()
    assert len(_cache_files(tmp_path / CACHE_FOLDER)) == 1
    tok.num_encodes = 0
    second = _lengths(_spec(path), tok)
    assert tok.num_encodes == 0 and second.tolist() == first.tolist()
    uncached = build_data(_spec(path), tok, INPUTS).train
    uncached.length_cache = None
    assert uncached.modality_lengths.tolist() == first.tolist() and tok.num_encodes > 0


CHANGES = {
    "tokenizer": lambda spec: (spec, _counting(build_tokenizer(vocab_size=700))),
    "template": lambda spec: (DataSpec(**{**vars(spec), "version": "llama3"}), _counting()),
    "model_max_length": lambda spec: (DataSpec(**{**vars(spec), "model_max_length": 256}), _counting()),
    "tiling": lambda spec: (DataSpec(**{**vars(spec), "max_dynamic_patch": 2}), _counting()),
}


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_a_change_that_fixes_lengths_counts_them_again(tmp_path, change):
    """Setup: a cached build; then the same data with another tokenizer (vocabulary and merges), template,
    --model_max_length or tiling.
    Expect: the changed build tokenizes and writes a second file; the first settings still read theirs."""
    path = _write_data(tmp_path)
    base = _spec(path)
    tok = _counting()
    before = _lengths(base, tok)
    spec, other = CHANGES[change](base)
    after = _lengths(spec, other)
    assert other.num_encodes > 0 and len(_cache_files(tmp_path / CACHE_FOLDER)) == 2
    if change == "tiling":  # the wide image tiles differently
        assert after.tolist() != before.tolist()
    tok.num_encodes = 0
    assert _lengths(base, tok).tolist() == before.tolist() and tok.num_encodes == 0


def test_the_tokenizer_digest_follows_content_not_the_object():
    """Setup: the demo tokenizer built twice, once with an added token.
    Expect: equal digests for equal tokenizers, another one once a token is added."""
    plain, again, more = build_tokenizer(), build_tokenizer(), build_tokenizer()
    more.add_tokens(["zebra"])
    assert tokenizer_digest(plain) == tokenizer_digest(again) != tokenizer_digest(more)


DAMAGE = {
    "truncated": lambda data: data[:-7],
    "flipped byte": lambda data: data[:-3] + bytes([data[-3] ^ 1]) + data[-2:],
    "garbled header": lambda data: data.replace(b'"num_records"', b'"num_recXrds"', 1).replace(b"{", b"[", 1),
    "empty": lambda data: b"",
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_cache_is_counted_again_and_replaced(tmp_path, damage, vitacore_log):
    """Setup: a cached build; the cache file then truncated, a payload byte flipped, its header garbled, or emptied.
    Expect: the next build notes the file is not usable, tokenizes, returns the right lengths and rewrites the
    file, which the build after reads without tokenizing."""
    path = _write_data(tmp_path)
    tok = _counting()
    right = _lengths(_spec(path), tok)
    (name,) = _cache_files(tmp_path / CACHE_FOLDER)
    cache = tmp_path / CACHE_FOLDER / name
    cache.write_bytes(DAMAGE[damage](cache.read_bytes()))
    tok.num_encodes = 0
    assert _lengths(_spec(path), tok).tolist() == right.tolist() and tok.num_encodes > 0
    assert f"note: length cache {cache} is not usable" in vitacore_log.text
    tok.num_encodes = 0
    assert _lengths(_spec(path), tok).tolist() == right.tolist() and tok.num_encodes == 0


def test_a_file_for_other_records_is_never_read(tmp_path, vitacore_log):
    """Setup: caches of two data files that differ in one record; the first's file copied over the second's name.
    Expect: the second build refuses it (its header names other settings), counts, and gets its own lengths."""
    one, two = tmp_path / "one", tmp_path / "two"
    path_one, path_two = _write_data(one), _write_data(two)
    records = json.loads(path_two.read_text())
    records[0]["conversations"][1]["value"] = "a much longer answer than before, with many more words in it"
    path_two.write_text(json.dumps(records))
    tok = _counting()
    _lengths(_spec(path_one), tok)
    right = _lengths(_spec(path_two), tok)
    (name_one,) = _cache_files(one / CACHE_FOLDER)
    (name_two,) = _cache_files(two / CACHE_FOLDER)
    assert name_one != name_two
    shutil.copy(one / CACHE_FOLDER / name_one, two / CACHE_FOLDER / name_two)
    tok.num_encodes = 0
    assert _lengths(_spec(path_two), tok).tolist() == right.tolist() and tok.num_encodes > 0
    assert "its header names other settings" in vitacore_log.text


def test_an_unwritable_data_folder_falls_back_to_the_output_folder(tmp_path, vitacore_log):
    """Setup: a file named .vitacore_lengths beside the data (so the folder cannot be made there); a build with an
    output folder, then one without.
    Expect: the cache goes to <output_dir>/length_cache and is read from there next time; without an output folder
    the lengths are still right and one note says they are not cached."""
    path = _write_data(tmp_path)
    (tmp_path / CACHE_FOLDER).write_text("in the way")
    out = tmp_path / "out"
    tok = _counting()
    right = _lengths(_spec(path, output_dir=str(out)), tok)
    assert len(_cache_files(out / OUTPUT_CACHE_FOLDER)) == 1
    tok.num_encodes = 0
    assert _lengths(_spec(path, output_dir=str(out)), tok).tolist() == right.tolist() and tok.num_encodes == 0
    assert _lengths(_spec(path), tok).tolist() == right.tolist() and tok.num_encodes > 0
    assert "note: modality lengths not cached (no writable folder" in vitacore_log.text


def test_length_cache_dir_overrides_the_folder(tmp_path):
    """Setup: --length_cache_dir parsed into the run's DataSpec; a build with it.
    Expect: the spec carries the folder and the output folder; the cache file is there, none beside the data."""
    folder, out = tmp_path / "lengths", tmp_path / "out"
    spec = data_spec(vitacore.parse_args(["--length_cache_dir", str(folder), "--output_dir", str(out)]), None, None)
    assert spec.length_cache_dir == str(folder) and spec.output_dir == str(out)
    path = _write_data(tmp_path)
    _lengths(_spec(path, length_cache_dir=str(folder)), _counting())
    assert len(_cache_files(folder)) == 1 and not _cache_files(tmp_path / CACHE_FOLDER)


def test_forked_processes_count_what_one_process_counts(tmp_path):
    """Setup: 300 records with media, counted in one process and in a pool of 2 forked processes (whole range and
    a sub-range).
    Expect: the same lengths, in record order."""
    path = _write_data(tmp_path, count=300)
    train = build_data(_spec(path), build_tokenizer(), INPUTS).train
    counter = LengthCounter(train.media_root, train.tokenizer, get_template(None), 4, AudioTransform(),
                            ImageTiler(32, 1, 4))
    serial = compute_lengths(train.records, counter, num_processes=1)
    assert compute_lengths(train.records, counter, num_processes=2).tolist() == serial.tolist()
    assert compute_lengths(train.records, counter, 17, 250, num_processes=2).tolist() == serial[17:250].tolist()


# One rank of a 2-process job: build the data, ask for the lengths, write them with the tokenizer calls made
# (a file per rank: the ranks' lines would interleave in one pipe).
_RANK_SCRIPT = '''
import json, sys
import torch.distributed as dist
from test_length_cache import INPUTS, _counting, _spec
from vitacore.data import build_data

dist.init_process_group("gloo")
tok = _counting()
lengths = build_data(_spec(sys.argv[1]), tok, INPUTS).train.modality_lengths
with open(f"{sys.argv[2]}/rank{dist.get_rank()}.json", "w") as fh:
    json.dump({"rank": dist.get_rank(), "lengths": lengths.tolist(), "encodes": tok.num_encodes}, fh)
dist.destroy_process_group()
'''


@pytest.mark.slow
def test_two_ranks_share_the_count_and_then_read_the_cache(tmp_path):
    """Setup: two torchrun ranks (gloo) build the same data and ask for the lengths, twice (two launches).
    Expect: at the first launch each rank tokenizes its share (together as many calls as one process alone) and
    both get the one-process lengths; one file was written; at the second launch neither rank tokenizes and both
    get the same lengths."""
    import subprocess
    import sys

    from launch import env_for, free_port

    path = _write_data(tmp_path, count=40)
    script = tmp_path / "rank.py"
    script.write_text(_RANK_SCRIPT)
    env = {**env_for(os.environ.get("VITACORE_CACHE", "")), "PYTHONPATH": os.pathsep.join(
        [os.path.dirname(__file__), os.path.join(os.path.dirname(__file__), ".."), os.environ.get("PYTHONPATH", "")])}
    tok = _counting()
    alone = build_data(_spec(path), tok, INPUTS).train
    alone.length_cache = None
    expected = alone.modality_lengths.tolist()

    def launch():
        for name in ("rank0.json", "rank1.json"):
            (tmp_path / name).unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), str(script), str(path), str(tmp_path)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]

    first = launch()
    assert [row["rank"] for row in first] == [0, 1]
    assert all(row["lengths"] == expected and row["encodes"] > 0 for row in first)
    assert first[0]["encodes"] + first[1]["encodes"] == tok.num_encodes  # disjoint shares, not the whole twice
    assert len(_cache_files(tmp_path / CACHE_FOLDER)) == 1
    second = launch()
    assert all(row["lengths"] == expected and row["encodes"] == 0 for row in second)
