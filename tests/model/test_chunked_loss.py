"""The chunked output head + cross-entropy (vitacore.model.loss) against transformers' own causal-LM loss.

The reference is what the LLM computes itself when given ``labels`` (transformers' ForCausalLMLoss over
full float32 logits), on the same merged embeddings; vitacore's forward must give the same loss and the
same gradient on every parameter, in float32, within 1e-5.
"""

import copy

import pytest
import torch
from tiny_models import media_batch

from vitacore.model.loss import chunked_head, linear_cross_entropy, next_token_targets
from vitacore.model.merge import merge_media_embeddings


def _reference_loss(model, batch, num_items=None):
    """transformers' loss on embeddings merged by hand (the tower, projector and audio stack run as usual)."""
    image_blocks, audio_blocks, _ = model.encode_media(batch["images"], batch["audios"], batch["audio_lengths"],
                                                       batch["audio_token_lengths"], torch.device("cpu"))
    merged = merge_media_embeddings(batch["input_ids"], batch["labels"], batch["attention_mask"],
                                    model.llm.get_input_embeddings(), image_blocks, audio_blocks,
                                    model.model_max_length)
    extra = {"num_items_in_batch": num_items} if num_items is not None else {}
    return model.llm(inputs_embeds=merged.inputs_embeds, attention_mask=merged.attention_mask,
                     position_ids=merged.position_ids, labels=merged.labels, use_cache=False, **extra).loss


def _grads(model):
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("chunk_size", [1, 3, 1024])
@pytest.mark.parametrize("num_items", [None, 7.0])
def test_loss_and_gradients_equal_transformers_loss(tiny_vita, tiny_dims, chunk_size, num_items):
    """Setup: the tiny VITA model (Qwen2 LLM, SigLIP tower, audio stack) in float32 on a batch of an image
    row, an audio row and a text row; vitacore's chunked loss with 1, 3 and 1024 positions per chunk, with
    and without a token-sum divisor, vs transformers' loss on a deep copy.
    Expect: loss and every parameter's gradient (LLM, head, projector, tower, audio) equal within 1e-5."""
    tiny_vita.eval()  # no dropout: both passes see the same network
    tiny_vita.loss_chunk_size = chunk_size
    reference = copy.deepcopy(tiny_vita)
    batch = media_batch(tiny_dims)
    divisor = None if num_items is None else torch.tensor(num_items)
    assert chunked_head(tiny_vita.llm) is tiny_vita.llm.lm_head  # the chunked path is the one under test
    out = tiny_vita(**batch, num_items_in_batch=divisor)
    assert "logits" not in out
    out["loss"].backward()
    expected = _reference_loss(reference, batch, divisor)
    expected.backward()
    torch.testing.assert_close(out["loss"], expected, rtol=0, atol=1e-5)
    got, want = _grads(tiny_vita), _grads(reference)
    assert set(got) == set(want) and "llm.lm_head.weight" in got and "mm_projector.0.weight" in got
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-5, msg=name)


def test_tied_head_and_bias_get_the_same_gradients():
    """Setup: a Linear head with a bias whose weight is the (trainable) input embedding, as tied LLMs have;
    chunked loss vs full logits + torch's cross-entropy.
    Expect: equal loss, and equal gradients for the hidden states, the shared weight and the bias."""
    torch.manual_seed(0)
    embed = torch.nn.Embedding(50, 8)
    head = torch.nn.Linear(8, 50, bias=True)
    head.weight = embed.weight
    ids = torch.randint(0, 50, (2, 9))
    labels = ids.clone()
    labels[:, :3] = -100
    targets = next_token_targets(labels)

    def run(chunked):
        embed.zero_grad()
        head.zero_grad()
        hidden = embed(ids).tanh()
        hidden.retain_grad()
        if chunked:
            loss = linear_cross_entropy(hidden, head, targets, chunk_size=4).loss
        else:
            logits = head(hidden).float()
            loss = torch.nn.functional.cross_entropy(logits.view(-1, 50), targets.view(-1), ignore_index=-100)
        loss.backward()
        return loss.detach(), embed.weight.grad.clone(), head.bias.grad.clone()

    for got, want in zip(run(True), run(False)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_token_losses_and_predictions_match_full_logits(tiny_vita, tiny_dims):
    """Setup: the tiny model in eval mode, chunked (2 per chunk) vs the full-logits path (loss_chunk_size 0).
    Expect: the same per-position losses and argmax predictions at supervised positions, and no logits
    returned by the chunked path."""
    tiny_vita.eval()
    batch = media_batch(tiny_dims)
    with torch.no_grad():
        tiny_vita.loss_chunk_size = 2
        chunked = tiny_vita(**batch)
        tiny_vita.loss_chunk_size = 0
        full = tiny_vita(**batch)
    assert "logits" not in chunked and "logits" in full
    supervised = full["targets"] != -100
    assert int(supervised.sum()) == 8  # 3 + 2 + 3 answer tokens after the shift
    torch.testing.assert_close(chunked["token_losses"], full["token_losses"], rtol=0, atol=1e-5)
    argmax = full["logits"].argmax(dim=-1)
    assert torch.equal(chunked["predictions"][supervised], argmax[supervised])
    assert (chunked["predictions"][~supervised] == -1).all()


def test_targets_never_cross_a_sample_boundary():
    """Setup: a packed row of two samples (segment ids 1, 1, 1, 2, 2) then padding (0).
    Expect: position 2 (the first sample's last token) gets no target, though the next label is supervised."""
    labels = torch.tensor([[-100, 5, 6, 7, 8, -100]])
    segments = torch.tensor([[1, 1, 1, 2, 2, 0]])
    assert next_token_targets(labels, segments).tolist() == [[5, 6, -100, 8, -100, -100]]
    assert next_token_targets(labels).tolist() == [[5, 6, 7, 8, -100, -100]]


@pytest.mark.slow
def test_zero3_two_ranks_step_equals_transformers_loss(tmp_path):
    """Setup: 2 processes (torchrun, gloo), ZeRO-3 with every tensor partitioned (threshold 0), the tiny
    VITA model trained one SGD step (lr 1) on a different micro-batch per rank with the chunked loss (3 per
    chunk); the reference is transformers' loss over both micro-batches on an unpartitioned copy.
    Expect: every gathered parameter after the step equals reference - gradient within 1e-5 on both ranks."""
    import os
    import subprocess
    import sys

    from launch import env_for, free_port

    driver = os.path.join(os.path.dirname(os.path.abspath(__file__)), "chunked_loss_zero3_driver.py")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             "--master_addr", "127.0.0.1", "--master_port", str(free_port()), driver],
                            capture_output=True, text=True, env=env_for(str(tmp_path / "cache")), timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert "OK 0" in result.stdout and "OK 1" in result.stdout
