"""Numbers in the config are finite and in range, refused at parse time naming the flag (before any model
loads): ``inf`` epochs used to pass and fail later with an OverflowError, ``nan`` slipped past ``>= 0`` rules."""

import pytest

from vitacore.config import parse_args


@pytest.mark.parametrize("flag,value", [
    ("num_train_epochs", "inf"), ("learning_rate", "nan"), ("max_grad_norm", "nan"), ("warmup_ratio", "nan"),
    ("weight_decay", "inf"), ("mm_projector_lr", "-inf"), ("max_bad_sample_ratio", "nan"), ("adam_beta2", "nan"),
])
def test_non_finite_numbers_are_refused_naming_the_flag(flag, value):
    with pytest.raises(ValueError) as err:
        parse_args([f"--{flag}", value])
    assert f"--{flag} {float(value)} must be a finite number" in str(err.value)


def test_adam_epsilon_must_be_positive():
    with pytest.raises(ValueError, match="--adam_epsilon 0.0 must be > 0"):
        parse_args(["--adam_epsilon", "0"])
    assert parse_args(["--adam_epsilon", "1e-10"]).training.adam_epsilon == 1e-10


def test_yaml_infinity_is_refused_too(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("training:\n  num_train_epochs: .inf\n")
    with pytest.raises(ValueError, match="--num_train_epochs inf must be a finite number"):
        parse_args(["--config", str(path)])
