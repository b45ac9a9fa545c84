"""Run under ``torchrun --nproc_per_node 2``: one ZeRO-3 step with the chunked loss vs transformers' loss.

Every rank builds the same tiny VITA model (float32, every part trainable) and a reference copy, then
trains one step of plain SGD (lr 1, no clipping) under ZeRO-3 on its own micro-batch, the loss being a
token sum over the global supervised-token count as the engine makes it. The reference takes
transformers' own loss over both ranks' micro-batches on the copy; the partitioned parameters, gathered
after the step, must equal the reference's after ``p - grad`` within 1e-5. Prints ``OK <rank>``.
"""

import copy
import os
import sys

import deepspeed
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tiny_models import TINY, build_tiny_vita, media_batch  # noqa: E402

from vitacore.constants import IGNORE_INDEX  # noqa: E402
from vitacore.model.merge import merge_media_embeddings  # noqa: E402

ZERO3 = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "train_batch_size": 2,
         "gradient_clipping": 0.0, "zero_allow_untested_optimizer": True, "steps_per_print": 10**9,
         # Threshold 0: even tiny tensors are partitioned, so a missing gather cannot hide.
         "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}


def rank_batch(rank: int) -> dict:
    """The image / audio / text rows, made different per rank (media negated, answers moved by one id)."""
    batch = media_batch(TINY)
    if rank == 1:
        batch["images"], batch["audios"] = -batch["images"], -batch["audios"]
        supervised = batch["labels"] != IGNORE_INDEX
        batch["labels"][supervised] = (batch["labels"][supervised] + 1) % TINY["vocab_size"]
        batch["input_ids"][supervised] = batch["labels"][supervised]
    return batch


def reference_loss(model, batch, num_items):
    """transformers' loss (full float32 logits) on embeddings merged by hand."""
    images, audios, _ = model.encode_media(batch["images"], batch["audios"], batch["audio_lengths"],
                                           batch["audio_token_lengths"], torch.device("cpu"))
    merged = merge_media_embeddings(batch["input_ids"], batch["labels"], batch["attention_mask"],
                                    model.llm.get_input_embeddings(), images, audios, model.model_max_length)
    return model.llm(inputs_embeds=merged.inputs_embeds, attention_mask=merged.attention_mask,
                     position_ids=merged.position_ids, labels=merged.labels, use_cache=False,
                     num_items_in_batch=num_items).loss


def main():
    deepspeed.init_distributed("gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    model = build_tiny_vita().eval()  # no dropout, so the reference sees the same network
    model.loss_chunk_size = 3
    reference = copy.deepcopy(model)
    batches = [rank_batch(r) for r in range(world)]
    num_items = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches)

    for batch in batches:
        reference_loss(reference, batch, torch.tensor(float(num_items))).backward()
    # Parameters the forward never reads (the tower's last layer, VITA takes layer -2) get no gradient.
    expected = {name: (p - p.grad if p.grad is not None else p).detach() for name, p in reference.named_parameters()}

    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ZERO3, dist_init_required=False)
    head = model.llm.lm_head.weight
    assert hasattr(head, "ds_id") and head.numel() == 0, "expected a partitioned output head"
    # DeepSpeed averages gradients over ranks: each rank divides its token sum by the global count / ranks.
    out = engine(**batches[rank], num_items_in_batch=torch.tensor(num_items / world))
    assert "logits" not in out  # the chunked path ran
    engine.backward(out["loss"])
    engine.step()

    checked = 0
    for name, param in model.named_parameters():
        with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
            torch.testing.assert_close(param.detach().clone(), expected[name], rtol=0, atol=1e-5, msg=name)
        checked += 1
    assert checked == len(expected) and "llm.lm_head.weight" in expected
    print(f"OK {rank} {checked} parameters", flush=True)


if __name__ == "__main__":
    main()
