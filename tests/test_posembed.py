"""dsclip.posembed against open_clip's own resize functions and on layouts open_clip cannot do."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import open_clip.model as oc_model
import pytest
import torch
import torch.nn.functional as F

from dsclip.posembed import resize_state_dict_pos_embeds, resize_text_pos_embed, resize_visual_pos_embed

# 32px images, patch 8: a 4x4 grid plus the class token.
TINY = json.loads((Path(__file__).parent / "assets" / "tiny-clip.json").read_text())


def _tiny_clip(image_size=None, context_length=None) -> oc_model.CLIP:
    cfg = copy.deepcopy(TINY)
    if image_size is not None:
        cfg["vision_cfg"]["image_size"] = image_size
    if context_length is not None:
        cfg["text_cfg"]["context_length"] = context_length
    torch.manual_seed(0)
    return oc_model.CLIP(**cfg)


def _state_dict(**kw) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in _tiny_clip(**kw).state_dict().items()}


@pytest.mark.parametrize("new_size", [48, 24])  # upsample, and a downsample where antialias matters
def test_square_grid_matches_open_clip(new_size):
    model = _tiny_clip(image_size=new_size)
    ours, theirs = _state_dict(), _state_dict()
    done = resize_state_dict_pos_embeds(ours, model)
    oc_model.resize_pos_embed(theirs, model)
    key = "visual.positional_embedding"
    assert ours[key].shape == model.visual.positional_embedding.shape
    assert torch.equal(ours[key], theirs[key])
    grid = new_size // 8
    assert done == [f"{key}: grid 4x4 -> {grid}x{grid} (1 prefix)"]
    model.load_state_dict(ours)  # strict: every shape now fits


def test_text_length_matches_open_clip():
    model = _tiny_clip(context_length=24)
    ours, theirs = _state_dict(), _state_dict()
    assert resize_state_dict_pos_embeds(ours, model) == ["positional_embedding: length 16 -> 24"]
    oc_model.resize_text_pos_embed(theirs, model)
    assert torch.equal(ours["positional_embedding"], theirs["positional_embedding"])
    pos = torch.randn(16, 8)
    assert torch.equal(
        resize_text_pos_embed(pos, 10),
        F.interpolate(pos.T[None], size=10, mode="linear", align_corners=False)[0].T,
    )


def test_non_square_model_grid_from_square_checkpoint():
    model = _tiny_clip(image_size=(32, 48))
    assert tuple(model.visual.grid_size) == (4, 6)
    sd = _state_dict()
    prefix = sd["visual.positional_embedding"][:1].clone()
    done = resize_state_dict_pos_embeds(sd, model)
    assert done == ["visual.positional_embedding: grid 4x4 -> 4x6 (1 prefix)"]
    assert torch.equal(sd["visual.positional_embedding"][:1], prefix)
    model.load_state_dict(sd)


def test_non_square_checkpoint_needs_old_grid():
    model = _tiny_clip()  # 4x4 grid
    sd = _state_dict(image_size=(16, 24))  # 2x3 grid: 1 + 6 rows, not a square
    with pytest.raises(ValueError, match="old_grid"):
        resize_state_dict_pos_embeds(dict(sd), model)
    assert resize_state_dict_pos_embeds(sd, model, old_grid=(2, 3)) == [
        "visual.positional_embedding: grid 2x3 -> 4x4 (1 prefix)"
    ]
    assert sd["visual.positional_embedding"].shape == (17, 64)


def test_transposed_grid_with_same_row_count_is_resized():
    model = _tiny_clip(image_size=(24, 16))  # 3x2 grid
    sd = _state_dict(image_size=(16, 24))  # 2x3 grid, same number of rows
    old = sd["visual.positional_embedding"].clone()
    assert resize_state_dict_pos_embeds(sd, model) == []  # without old_grid nothing says they differ
    assert resize_state_dict_pos_embeds(sd, model, old_grid=(2, 3)) == [
        "visual.positional_embedding: grid 2x3 -> 3x2 (1 prefix)"
    ]
    assert torch.equal(sd["visual.positional_embedding"], resize_visual_pos_embed(old, (2, 3), (3, 2)))


@pytest.mark.parametrize("prefix", [0, 1, 4])
def test_prefix_rows_are_kept_and_grid_is_row_major(prefix):
    rows = torch.arange(4, dtype=torch.float32).repeat_interleave(4)  # value = grid row index
    patches = rows[:, None].expand(16, 3)
    pos = torch.cat([torch.randn(prefix, 3), patches])
    out = resize_visual_pos_embed(pos, (4, 4), (4, 6), num_prefix_tokens=prefix)
    assert out.shape == (prefix + 24, 3)
    assert torch.equal(out[:prefix], pos[:prefix])
    # Only the width changed, so every new row keeps its original (constant) value.
    grid = out[prefix:].reshape(4, 6, 3)
    torch.testing.assert_close(grid, torch.arange(4.0)[:, None, None].expand(4, 6, 3), atol=1e-6, rtol=1e-6)


def test_dtype_kept_and_fp32_compute():
    pos = torch.randn(1 + 16, 8).bfloat16()
    out = resize_visual_pos_embed(pos, (4, 4), (5, 7))
    assert out.dtype == torch.bfloat16 and out.shape == (36, 8)
    assert torch.equal(out, resize_visual_pos_embed(pos.float(), (4, 4), (5, 7)).bfloat16())
    assert resize_text_pos_embed(torch.randn(16, 4).half(), 20).dtype == torch.float16


def test_equal_sizes_are_untouched():
    pos = torch.randn(17, 8)
    assert resize_visual_pos_embed(pos, (4, 4), (4, 4)) is pos
    assert resize_text_pos_embed(pos, 17) is pos
    sd = _state_dict()
    before = {k: v for k, v in sd.items()}
    assert resize_state_dict_pos_embeds(sd, _tiny_clip()) == []
    assert all(sd[k] is before[k] for k in sd)


def test_wrong_row_count_is_rejected():
    with pytest.raises(ValueError, match="prefix"):
        resize_visual_pos_embed(torch.randn(20, 4), (4, 4), (6, 6))


# ------------------------------------------------------------------ the checkpoint's own grid, end to end

def _load(*flags: str):
    from dsclip.config import parse_args
    from dsclip.model import create_model
    from tests.launch import TINY as TINY_PATH

    return create_model(parse_args(["--model", TINY_PATH, "--lr", "1e-4", *flags]))


def _checkpoint_32x48(tmp_path, record: str) -> tuple[str, torch.Tensor]:
    """Weights trained at 32x48 px (a 4x6 grid) that say so the way ``record`` names, or not at all."""
    from safetensors.torch import save_file

    from dsclip.export import save_weights

    sd = {k: v.contiguous() for k, v in _state_dict(image_size=(32, 48)).items()}
    cfg = copy.deepcopy(TINY)
    cfg["vision_cfg"]["image_size"] = [32, 48]
    path = tmp_path / "ft32x48.safetensors"
    if record == "metadata":  # what `dsclip export` writes, also inside a run's final.safetensors
        save_weights(sd, str(path), cfg)
    else:
        save_file(sd, str(path))
        if record == "sidecar":  # the .model.json `dsclip export` writes beside it
            (tmp_path / "ft32x48.model.json").write_text(json.dumps(cfg))
    return str(path), sd["visual.positional_embedding"]


@pytest.mark.parametrize("record", ["metadata", "sidecar"])
@pytest.mark.parametrize("new_size", [(48, 48), (48, 32)])
def test_non_square_checkpoint_grid_comes_from_its_config(tmp_path, record, new_size):
    path, old = _checkpoint_32x48(tmp_path, record)
    bundle = _load("--pretrained", path, "--force-image-size", *map(str, new_size))
    new_grid = (new_size[0] // 8, new_size[1] // 8)
    # 48x32 has as many positions as 32x48: only the recorded grid shows it must be transposed
    expected = resize_visual_pos_embed(old, (4, 6), new_grid)
    assert torch.equal(bundle.model.visual.positional_embedding.detach(), expected)
    assert f"visual.positional_embedding: grid 4x6 -> {new_grid[0]}x{new_grid[1]} (1 prefix)" in bundle.notes


def test_unrecorded_non_square_checkpoint_is_a_clear_error(tmp_path):
    from dsclip.config import ConfigError

    path, _ = _checkpoint_32x48(tmp_path, "none")
    with pytest.raises(ConfigError) as err:  # 24 positions: 4x6, 6x4, 3x8, ... nothing says which
        _load("--pretrained", path, "--force-image-size", "48")
    msg = str(err.value)
    assert "cannot tell the patch grid" in msg and "4x6" in msg and "vision_cfg.image_size" in msg
    assert "\n" not in msg


def test_model_config_grid_wins_over_sqrt():
    from dsclip.posembed import checkpoint_grid

    sd = _state_dict(image_size=(16, 64))  # a 2x8 grid: 16 positions, a square count
    model = _tiny_clip(image_size=48)
    cfg = copy.deepcopy(TINY)
    cfg["vision_cfg"]["image_size"] = [16, 64]
    assert checkpoint_grid(sd, model, [None, cfg]) == (2, 8)
    assert checkpoint_grid(sd, model, [TINY]) == (4, 4)  # the config gives 4x4: 16 positions too
    assert checkpoint_grid(sd, model, []) == (4, 4)  # nothing recorded: square
