"""Tests for vitacore.model.zero3_view: under ZeRO-3, frozen encoders and adapters held out of the engine."""

import pytest
import torch
from tiny_models import TINY, build_tiny_vita, media_batch

from vitacore.model import Zero3View, module_for_engine
from vitacore.model.encoder_sync import dummy_audio_output, dummy_image_output
from vitacore.model.zero3_view import frozen_parts


def _stage(model, trained: set[str]):
    for unit, module in model.unit_modules().items():
        module.requires_grad_(unit in trained)
    model.eval_units = tuple(set(model.unit_modules()) - trained)
    return model


def test_frozen_parts_are_the_units_without_a_trainable_parameter_except_the_llm():
    """Setup: the tiny model with all seven units, frozen as in stage 4 (LLM and projector train), then as in
    stage 1 with one trainable bias inside the tower. Expect: every other unit held out, the LLM
    never (frozen in stage 1), and a unit with a single trainable tensor not held out."""
    model = _stage(build_tiny_vita(audio_prompt_num=2, state_head=True), {"llm", "mm_projector"})
    assert set(frozen_parts(model)) == {"vision_tower", "audio_encoder", "audio_adapter", "audio_prompt",
                                        "state_head"}
    _stage(model, {"mm_projector"})
    dict(model.vision_tower.named_parameters())["encoder.head.mlp.fc2.bias"].requires_grad_(True)
    assert set(frozen_parts(model)) == {"audio_encoder", "audio_adapter", "audio_prompt", "state_head"}


def zero(stage: int) -> dict:
    return {"zero_optimization": {"stage": stage}}


@pytest.mark.parametrize("config, mode", [(None, "whole"), (zero(0), "whole"), (zero(2), "whole"),
                                          (zero(3), "partitioned")])
def test_below_zero3_or_partitioned_the_engine_gets_the_model_itself(config, mode):
    model = _stage(build_tiny_vita(), {"mm_projector"})
    assert module_for_engine(model, config, mode) is model


def test_a_model_without_units_or_without_frozen_parts_is_handed_over_as_it_is():
    plain = torch.nn.Linear(3, 3)
    assert module_for_engine(plain, zero(3)) is plain
    model = build_tiny_vita()  # everything trains
    assert module_for_engine(model, zero(3)) is model


def test_an_unknown_mode_names_the_flag():
    with pytest.raises(ValueError, match=r"--zero3_frozen_parts 'replicated': choose one of whole, partitioned"):
        module_for_engine(build_tiny_vita(), zero(3), "replicated")


def test_the_view_shares_the_model_parts_names_and_outputs():
    """Setup: stage 4's freezing on the tiny model; the view built directly (no partitioning to undo).
    Expect: the view's parameters are the model's own tensors under the same names, minus the held-out
    parts'; its state dict keys are the model's minus theirs; its forward gives the model's loss."""
    model = _stage(build_tiny_vita(), {"llm", "mm_projector"})
    held_out = frozen_parts(model)
    view = Zero3View(model, held_out)
    mine = dict(model.named_parameters())
    theirs = dict(view.named_parameters())
    assert theirs and set(theirs) == {n for n in mine if n.split(".")[0] not in held_out}
    assert all(theirs[name] is mine[name] for name in theirs)
    assert set(view.state_dict()) == {k for k in model.state_dict() if k.split(".")[0] not in held_out}
    assert view.whole_model is model and view.config is model.config
    batch = media_batch(TINY)
    model.eval()
    torch.manual_seed(0)
    expected = model(**batch)["loss"]
    torch.manual_seed(0)
    assert torch.equal(view(**batch)["loss"], expected)
    prompt = torch.tensor([[1, 2, 3]])
    assert view.generate(prompt, max_new_tokens=3) == model.generate(prompt, max_new_tokens=3)


def test_train_and_eval_reach_the_held_out_parts_and_keep_frozen_units_in_eval():
    model = _stage(build_tiny_vita(), {"llm", "mm_projector"})
    view = Zero3View(model, frozen_parts(model))
    view.eval()
    assert not view.training and not model.training and not model.llm.training
    view.train()
    assert view.training and model.training and model.llm.training and model.mm_projector.training
    # Frozen units stay in eval mode while training (dropout off), held out or not.
    assert not model.vision_tower.training and not model.audio_encoder.training


def test_with_held_out_frozen_encoders_the_dummy_passes_skip_them():
    """Setup: several ranks' switch on, stage 4's freezing, no partitioned parameter anywhere (as the held-out
    parts are after module_for_engine). Expect: the vision pass runs the trainable projector alone on one
    token (its sum equals the projector's output on zeros), and the audio pass, with encoder and adapter
    frozen, runs nothing."""
    model = _stage(build_tiny_vita(), {"llm", "mm_projector"})
    model.run_all_encoders = True
    calls = []
    handle = model.vision_tower.register_forward_hook(lambda *args: calls.append("tower"))
    out = dummy_image_output(model, torch.device("cpu"))
    handle.remove()
    assert calls == []
    zeros = torch.zeros(1, 1, model.vision_tower.hidden_size)
    assert torch.equal(out, model.mm_projector(zeros).sum())
    assert dummy_audio_output(model, torch.device("cpu")) is None
