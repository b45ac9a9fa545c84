"""vitacore.model.remote_code's parts on their own: the timm stand-in, DropPath, and the strict weight
reader's file formats (the released InternViT folder as a whole is tested in test_internvit.py)."""

import json
import os
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import write_real_internvit

from vitacore.model.remote_code import DropPath, WeightFiles, timm_standin
from vitacore.model.vision import load_vision_tower


def test_drop_path_has_stochastic_depth_semantics():
    x = torch.randn(4000, 3, 5)
    assert DropPath(0.0).train()(x) is x and DropPath(0.3).eval()(x) is x
    torch.manual_seed(0)
    out = DropPath(0.25).train()(x)
    kept = (out != 0).flatten(1).any(1)
    # Whole samples are dropped or kept; kept ones are scaled by 1 / keep-probability.
    assert torch.equal(out[~kept], torch.zeros_like(out[~kept]))
    torch.testing.assert_close(out[kept], x[kept] / 0.75)
    assert abs((~kept).float().mean().item() - 0.25) < 0.03
    unscaled = DropPath(0.25, scale_by_keep=False).train()(x)
    kept = (unscaled != 0).flatten(1).any(1)
    assert torch.equal(unscaled[kept], x[kept])
    assert repr(DropPath(0.1)) == "DropPath(drop_prob=0.100)"


def test_timm_standin_is_temporary_and_never_shadows_an_installed_timm(tmp_path, monkeypatch):
    with timm_standin() as active:
        from timm.layers import DropPath as from_layers
        from timm.models.layers import DropPath as from_models
        assert active and from_models is DropPath and from_layers is DropPath
    assert not any(name == "timm" or name.startswith("timm.") for name in sys.modules)
    with pytest.raises(ModuleNotFoundError):
        import timm  # noqa: F401

    # An installed timm (here a package on sys.path) is the one the remote code gets.
    (tmp_path / "timm").mkdir()
    (tmp_path / "timm" / "__init__.py").write_text("INSTALLED = True\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        with timm_standin() as active:
            import timm

            assert not active and timm.INSTALLED
    finally:
        sys.modules.pop("timm", None)


@pytest.mark.parametrize("layout", ["bin", "sharded_safetensors", "sharded_bin"])
def test_weights_load_from_every_layout_transformers_saves(tmp_path, layout):
    folder = write_real_internvit(tmp_path / layout, seed=7)
    stored = load_file(os.path.join(folder, "model.safetensors"))
    os.remove(os.path.join(folder, "model.safetensors"))
    keys = sorted(stored)
    shards = [keys[: len(keys) // 2], keys[len(keys) // 2:]]
    if layout == "bin":
        torch.save(stored, os.path.join(folder, "pytorch_model.bin"))
    else:
        suffix = "safetensors" if layout == "sharded_safetensors" else "bin"
        weight_map = {}
        for index, names in enumerate(shards):
            name = f"model-{index + 1:05d}-of-00002.{suffix}"
            part = {k: stored[k] for k in names}
            if suffix == "safetensors":
                save_file(part, os.path.join(folder, name), metadata={"format": "pt"})
            else:
                torch.save(part, os.path.join(folder, name))
            weight_map.update(dict.fromkeys(names, name))
        index_name = "model.safetensors.index.json" if suffix == "safetensors" else "pytorch_model.bin.index.json"
        with open(os.path.join(folder, index_name), "w") as fh:
            json.dump({"metadata": {}, "weight_map": weight_map}, fh)
    files = WeightFiles(folder)
    assert set(files.file_of) == set(stored) and files.shape(keys[0]) == tuple(stored[keys[0]].shape)
    state = load_vision_tower(folder, trust_remote_code=True).encoder.state_dict()
    assert set(state) == set(stored) and all(torch.equal(state[k], v.float()) for k, v in stored.items())
