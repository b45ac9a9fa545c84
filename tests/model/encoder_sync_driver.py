"""Driver of test_encoder_sync's 2-process test: ranks whose micro-batches differ in media train in step.

    PYTHONPATH=tests torchrun --nproc_per_node 2 tests/model/encoder_sync_driver.py OUT_PREFIX

For each case (ZeRO stage, whether the encoders train), both ranks build the same tiny model (a
SigLIP tower and a Whisper encoder), train six one-sample micro-batches: four in which their media
differ (rank 0: image + audio, text, image, audio; rank 1: text, image + audio, audio, image), then
text on both, then an image on both (no audio on either), and write
``OUT_PREFIX.rank<R>.pt``: per case the losses, the trainable parameters before and after (gathered),
and how often the tower and the audio encoder ran in each step.
"""

import sys

import deepspeed
import torch
from tiny_models import TINY, build_tiny_vita
from transformers import WhisperConfig, WhisperFeatureExtractor
from transformers.models.whisper.modeling_whisper import WhisperEncoder

import vitacore
from vitacore.checkpoint import gathered_state
from vitacore.constants import AUDIO_TOKEN_INDEX as AUD
from vitacore.constants import IGNORE_INDEX as IGN
from vitacore.constants import IMAGE_TOKEN_INDEX as IMG
from vitacore.data.whisper_audio import whisper_token_length
from vitacore.model.audio import AudioAdapter
from vitacore.model.whisper import WhisperAudioEncoder

CASES = (("zero3", "trainable"), ("zero3", "frozen"), ("zero2", "frozen"))
PATTERNS = (("image+audio", "text", "image", "audio", "text", "image"),
            ("text", "image+audio", "audio", "image", "text", "image"))
WHISPER_MEL, WHISPER_SECONDS, CLIP_FRAMES = 16, 2, 30


def build_model() -> vitacore.VitaModel:
    """The tiny VitaModel with its audio side replaced by a tiny Whisper encoder (2 s window) and an adapter."""
    model = build_tiny_vita(seed=0)
    frames = WHISPER_SECONDS * 100
    config = WhisperConfig(num_mel_bins=WHISPER_MEL, d_model=16, encoder_layers=1, encoder_attention_heads=2,
                           encoder_ffn_dim=32, max_source_positions=frames // 2)
    extractor = WhisperFeatureExtractor(feature_size=WHISPER_MEL, chunk_length=WHISPER_SECONDS)
    model.audio_encoder = WhisperAudioEncoder(WhisperEncoder(config), extractor, source="tiny")
    model.audio_adapter = AudioAdapter(16, TINY["llm_hidden"])
    return model


def micro_batch(kind: str, step: int) -> dict:
    """One sample: text, with an image and / or a clip as ``kind`` says."""
    g = torch.Generator().manual_seed(step)
    media = ([IMG] if "image" in kind else []) + ([AUD] if "audio" in kind else [])
    text = torch.randint(1, TINY["vocab_size"], (6,), generator=g).tolist()
    ids = text[:2] + media + text[2:]
    labels = [IGN] * (2 + len(media)) + text[2:]
    batch = {"input_ids": torch.tensor([ids]), "labels": torch.tensor([labels]),
             "attention_mask": torch.ones(1, len(ids), dtype=torch.long)}
    if "image" in kind:
        batch["images"] = torch.randn(1, 3, TINY["image_size"], TINY["image_size"], generator=g)
    if "audio" in kind:
        batch.update(audios=torch.randn(1, CLIP_FRAMES, WHISPER_MEL, generator=g),
                     audio_lengths=torch.tensor([CLIP_FRAMES]),
                     audio_token_lengths=torch.tensor([whisper_token_length(CLIP_FRAMES)]))
    return batch


def trainable_values(model) -> dict:
    """The trainable parameters, gathered (a collective under ZeRO-3) and copied."""
    names = {name for name, p in model.named_parameters() if p.requires_grad}
    return {name: value for name, value in gathered_state(model, parameters_only=True).items() if name in names}


def run_case(stage: str, encoders: str, dist) -> dict:
    model = build_model()
    if encoders == "frozen":
        model.vision_tower.requires_grad_(False)
        model.audio_encoder.requires_grad_(False)
        model.eval_units = ("vision_tower", "audio_encoder")
    vitacore.prepare_for_training(model, False, None, dist.world_size, dist.device)
    zero = {"stage": 3, "stage3_param_persistence_threshold": 0} if stage == "zero3" else {"stage": 2}
    config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "steps_per_print": 10**9,
              "zero_allow_untested_optimizer": True, "zero_optimization": zero}
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, _, _, _ = deepspeed.initialize(model=model, config=config, dist_init_required=False,
                                           optimizer=torch.optim.AdamW(trainable, lr=1e-2))
    engine.train()
    calls = {"tower": 0, "audio": 0}
    model.vision_tower.register_forward_pre_hook(lambda *_: calls.update(tower=calls["tower"] + 1))
    model.audio_encoder.register_forward_pre_hook(lambda *_: calls.update(audio=calls["audio"] + 1))
    before = trainable_values(model)
    losses, ran = [], []
    for step, kind in enumerate(PATTERNS[dist.rank]):
        calls.update(tower=0, audio=0)
        loss = engine(**micro_batch(kind, 10 * dist.rank + step))["loss"]
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
        ran.append(dict(calls))
    return {"losses": losses, "ran": ran, "before": before, "after": trainable_values(model)}


def main(out_prefix: str) -> None:
    dist = vitacore.init_distributed(timeout_s=60)  # a rank left waiting in a collective fails fast
    results = {f"{stage}-{encoders}": run_case(stage, encoders, dist) for stage, encoders in CASES}
    torch.save({"patterns": PATTERNS[dist.rank], "cases": results}, f"{out_prefix}.rank{dist.rank}.pt")


if __name__ == "__main__":
    main(sys.argv[1])
