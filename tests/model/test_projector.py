"""Tests for vitacore.model.projector.build_projector."""

import pytest
import torch
import torch.nn as nn

from vitacore.model.projector import build_projector


def test_linear_projector_is_a_single_linear_layer():
    proj = build_projector("linear", 12, 20)
    assert isinstance(proj, nn.Linear)
    assert proj.in_features == 12 and proj.out_features == 20
    assert sorted(n for n, _ in proj.named_parameters()) == ["bias", "weight"]


def test_identity_projector_passes_features_through():
    proj = build_projector("identity", 8, 8)
    assert isinstance(proj, nn.Identity)
    x = torch.randn(2, 5, 8)
    assert torch.equal(proj(x), x)
    assert list(proj.parameters()) == []


def test_identity_with_mismatched_widths_raises():
    with pytest.raises(ValueError) as err:
        build_projector("identity", 8, 16)
    message = str(err.value)
    assert "--mm_projector_type" in message
    assert "8" in message and "16" in message


def test_mlp2x_gelu_structure_and_parameter_names():
    proj = build_projector("mlp2x_gelu", 6, 10)
    assert isinstance(proj, nn.Sequential)
    assert len(proj) == 3
    assert isinstance(proj[0], nn.Linear) and isinstance(proj[1], nn.GELU) and isinstance(proj[2], nn.Linear)
    assert (proj[0].in_features, proj[0].out_features) == (6, 10)
    assert (proj[2].in_features, proj[2].out_features) == (10, 10)
    assert sorted(proj.state_dict()) == ["0.bias", "0.weight", "2.bias", "2.weight"]


def test_mlp2x_gelu_computes_linear_gelu_linear():
    torch.manual_seed(0)
    proj = build_projector("mlp2x_gelu", 4, 7)
    x = torch.randn(3, 4)
    l0, l2 = proj[0], proj[2]
    expected = torch.nn.functional.gelu(x @ l0.weight.T + l0.bias) @ l2.weight.T + l2.bias
    torch.testing.assert_close(proj(x), expected)


def test_mlp3x_gelu_has_linear_layers_at_0_2_4():
    proj = build_projector("mlp3x_gelu", 5, 9)
    assert len(proj) == 5
    for index in (0, 2, 4):
        assert isinstance(proj[index], nn.Linear), index
    for index in (1, 3):
        assert isinstance(proj[index], nn.GELU), index
    assert proj[0].in_features == 5
    assert all(proj[i].out_features == 9 for i in (0, 2, 4))
    expected_keys = sorted(f"{i}.{p}" for i in (0, 2, 4) for p in ("weight", "bias"))
    assert sorted(proj.state_dict()) == expected_keys


def test_mlp1x_gelu_is_one_linear_layer():
    proj = build_projector("mlp1x_gelu", 5, 9)
    assert isinstance(proj, nn.Sequential) and len(proj) == 1
    assert isinstance(proj[0], nn.Linear)


@pytest.mark.parametrize("name", ["mlp", "mlp0x_gelu", "conv", "mlp2x_relu", "Linear", ""])
def test_unknown_projector_type_raises_with_known_types(name):
    with pytest.raises(ValueError) as err:
        build_projector(name, 4, 4)
    message = str(err.value)
    assert "--mm_projector_type" in message
    assert repr(name) in message
    for known in ("linear", "identity", "mlp2x_gelu"):
        assert known in message
