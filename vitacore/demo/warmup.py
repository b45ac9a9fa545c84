"""The two short trainings that make the embedded default learnable: tower pre-training, LLM warm-up.

Both run through :func:`train_steps`, a plain-PyTorch AdamW loop (no DeepSpeed: this is asset
building, done once and cached, before any run's engine exists).
"""

from __future__ import annotations

import math
import random
import time
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from vitacore.console import logger
from vitacore.data.conversation import get_template, tokenize_conversation
from vitacore.data.dataset import Collator, Sample
from vitacore.demo import synthetic

WARMUP_STEPS = 300
WARMUP_BATCH = 32
WARMUP_LR = 2e-3
TOWER_STEPS = 1000
TOWER_BATCH = 32
TOWER_LR = 2e-3
_LOG_EVERY = 100


def train_steps(module: torch.nn.Module, parameters: Sequence[torch.nn.Parameter],
                loss_at: Callable[[int], torch.Tensor], num_steps: int, learning_rate: float, label: str,
                multiplier: Optional[Callable[[int], float]] = None, max_grad_norm: Optional[float] = None) -> None:
    """``num_steps`` AdamW steps (no weight decay) on ``loss_at(step)``, logging every 100 steps.

    Args:
        module: put in train mode for the loop and in eval mode after it.
        parameters: what the optimizer updates.
        loss_at: the loss of step ``step`` (it draws its own batch).
        num_steps: optimizer steps.
        learning_rate: AdamW's base rate.
        label: names the loop in the log (``"warm-up"``).
        multiplier: an LR schedule as a ``LambdaLR`` multiplier of the step; None: constant.
        max_grad_norm: clip the gradient norm to this before each step; None: no clipping.
    """
    parameters = list(parameters)
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier) if multiplier else None
    module.train()
    started = time.time()
    for step in range(num_steps):
        loss = loss_at(step)
        loss.backward()
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(parameters, max_grad_norm)
        optimizer.step()
        if schedule is not None:
            schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % _LOG_EVERY == 0 or step == num_steps - 1:
            logger.info(f"vitacore: {label} step {step}/{num_steps} loss {loss.item():.4f} "
                        f"({time.time() - started:.0f}s)")
    module.eval()


def pretrain_tower(tower) -> None:
    """Give the random tower what a real pretrained one has: features that name what is drawn.

    Every patch token of the layer VITA reads (-2) learns to predict colour and shape, so a
    per-token projector can carry the whole answer. Without this, a random tower leaves shape
    ambiguous (circle vs square) and stage 1 plateaus.
    """
    colours, shapes = list(synthetic.COLOURS), list(synthetic.SHAPES)
    width = tower.config.hidden_size
    heads = torch.nn.ModuleDict({"colour": torch.nn.Linear(width, len(colours)),
                                 "shape": torch.nn.Linear(width, len(shapes))})
    rng = random.Random(11)
    size = tower.config.image_size

    def loss_at(step: int) -> torch.Tensor:
        images, colour_ids, shape_ids = [], [], []
        for _ in range(TOWER_BATCH):
            colour, shape = rng.randrange(len(colours)), rng.randrange(len(shapes))
            image = synthetic.draw_shape(rng, colours[colour], shapes[shape], size)
            images.append(torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1))
            colour_ids.append(colour)
            shape_ids.append(shape)
        features = tower(pixel_values=torch.stack(images), output_hidden_states=True).hidden_states[-2]
        tokens = features.shape[1]
        return sum(
            torch.nn.functional.cross_entropy(heads[name](features).flatten(0, 1),
                                              torch.tensor(ids).repeat_interleave(tokens))
            for name, ids in (("colour", colour_ids), ("shape", shape_ids)))

    train_steps(tower, [*tower.parameters(), *heads.parameters()], loss_at, TOWER_STEPS, TOWER_LR,
                "tower pre-training")


def warm_up_llm(llm, tokenizer) -> None:
    """Teach the tiny LLM to answer from context words (text only, fp32)."""
    template = get_template("qwen2p5_instruct")
    samples = []
    for record in synthetic.text_warmup_records(seed=5, count=4000):
        modality = "lang" if record["modality"] == "audio" else record["modality"]
        ids, labels = tokenize_conversation(record["conversations"], tokenizer, template, modality,
                                            audio_query=record["modality"] == "audio")
        samples.append(Sample(record["id"], ids, labels, [], [], [], modality))
    collate = Collator(tokenizer.pad_token_id)
    rng = random.Random(7)

    def loss_at(step: int) -> torch.Tensor:
        batch = collate(rng.sample(samples, WARMUP_BATCH))
        return llm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss

    def multiplier(step: int) -> float:
        return min(1.0, (step + 1) / 30) * 0.5 * (1 + math.cos(math.pi * step / WARMUP_STEPS))

    train_steps(llm, llm.parameters(), loss_at, WARMUP_STEPS, WARMUP_LR, "warm-up", multiplier=multiplier,
                max_grad_norm=1.0)
