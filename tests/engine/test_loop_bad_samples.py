"""A Trainer run over data with a missing image and a corrupt wav (``--on_bad_sample skip``).

Real DeepSpeed (ZeRO-0, one gloo process, CPU) and a tiny random text-only Qwen2: the bad records
are replaced by text records before the model sees them, so the model needs no media towers.
"""

import json
import logging
import os

import numpy as np
import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from vitacore.checkpoint import CheckpointConfig, Checkpointer
from vitacore.data.audio import AudioTransform, write_wav
from vitacore.data.conversation import QWEN2P5_INSTRUCT
from vitacore.data.dataset import Collator, VitaJsonDataset
from vitacore.data.images import ImageTransform
from vitacore.data.records import RejectedRecord
from vitacore.demo.tokenizer import build_tokenizer
from vitacore.engine import LoopConfig, OptimConfig, Trainer, resolve_deepspeed_config
from vitacore.model.multimodal import VitaModel


def _run(tmp_path, dist, max_ratio: float, workers: int = 0, rejected=()):
    tok = build_tokenizer()
    write_wav(tmp_path / "fine.wav", 0.3 * np.sin(np.arange(3200) / 10.0), 16000)
    (tmp_path / "broken.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunkjunkjunk")
    records = [{"id": f"t{i}", "conversations": [{"from": "human", "value": f"say {i}"},
                                                  {"from": "gpt", "value": f"{i}"}]} for i in range(6)]
    records.insert(2, {"id": "no-image", "image": "gone.png",
                       "conversations": [{"from": "human", "value": "<image> what?"}, {"from": "gpt", "value": "x"}]})
    records.insert(5, {"id": "bad-wav", "audio": "broken.wav",
                       "conversations": [{"from": "human", "value": "<audio>"}, {"from": "gpt", "value": "y"}]})
    dataset = VitaJsonDataset(records, str(tmp_path), tok, QWEN2P5_INSTRUCT, ImageTransform(16, (0.5,) * 3, (0.5,) * 3),
                              AudioTransform(), source="train.json", on_bad_sample="skip", model_max_length=256,
                              rejected=rejected)
    torch.manual_seed(0)
    llm = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                       num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                       max_position_embeddings=512, pad_token_id=tok.pad_token_id))
    model = VitaModel(llm, model_max_length=256)
    loop = LoopConfig(max_steps=4, per_device_train_batch_size=2, logging_steps=2, save_strategy="no", seed=7,
                      max_bad_sample_ratio=max_ratio, min_samples_for_bad_ratio=0, dataloader_num_workers=workers)
    optim = OptimConfig(learning_rate=1e-3)
    checkpointer = Checkpointer(CheckpointConfig(str(tmp_path / "out")), dist)
    ds_config, _ = resolve_deepspeed_config(None, loop=loop, optim=optim, world_size=dist.world_size, hidden_size=32)
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"name": "all", "params": [p for _, p in params], "param_names": [n for n, _ in params],
               "lr": optim.learning_rate, "weight_decay": 0.0}]
    trainer = Trainer(model, groups, dataset, Collator(tok.pad_token_id), dist, loop=loop, optim=optim,
                      deepspeed_config=ds_config, checkpointer=checkpointer)
    return trainer.fit(), checkpointer.output_dir


@pytest.mark.parametrize("workers", [0, 2])  # the markers cross from worker processes in the batch
def test_skip_finishes_and_metrics_count_the_bad_samples(tmp_path, dist, caplog, workers):
    with caplog.at_level(logging.INFO, logger="vitacore"):
        result, out = _run(tmp_path, dist, max_ratio=0.5, workers=workers)
    assert result.num_steps == 4
    with open(os.path.join(out, "metrics.jsonl")) as fh:
        rows = [json.loads(line) for line in fh if "loss" in line]
    assert len(rows) == 2 and all("bad_samples" in row for row in rows)
    assert sum(row["bad_samples"] for row in rows) == 2  # one epoch: each bad record drawn once
    warnings = "\n".join(record.getMessage() for record in caplog.records)
    lines = [line for line in warnings.splitlines() if line.startswith("warning: skipped a bad sample")]
    assert len(lines) == 2, lines  # each file once
    assert any("gone.png" in line for line in lines) and any("broken.wav" in line for line in lines)


def test_too_many_bad_samples_stop_the_run(tmp_path, dist):
    too_many = r"of the \d+ training samples seen so far were bad.*--max_bad_sample_ratio 0.1"
    with pytest.raises(ValueError, match=too_many):
        _run(tmp_path, dist, max_ratio=0.1)


def test_records_dropped_at_load_are_counted_in_every_row(tmp_path, dist):
    dropped = [RejectedRecord(9, "train.json: record 9: field 'conversations[1]'.from is 'human' where 'gpt' ...")]
    _, out = _run(tmp_path, dist, max_ratio=0.5, rejected=dropped)
    with open(os.path.join(out, "metrics.jsonl")) as fh:
        rows = [json.loads(line) for line in fh if "loss" in line]
    assert len(rows) == 2 and all(row["bad_records_at_load"] == 1 for row in rows)
