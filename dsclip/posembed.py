"""Position-embedding interpolation for fine-tuning at a new image size or context length.

A checkpoint's learned embeddings are a grid (vision) or a sequence (text); resizing them keeps
the learned spatial/positional structure instead of re-initialising the table.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# open_clip's key names: CLIP keeps the text tower at the top level, CustomTextCLIP under `text.`.
VISUAL_KEY = "visual.positional_embedding"
TEXT_KEYS = ("positional_embedding", "text.positional_embedding")


def resize_visual_pos_embed(
    pos: Tensor,
    old_grid: tuple[int, int],
    new_grid: tuple[int, int],
    num_prefix_tokens: int = 1,
) -> Tensor:
    """Resize a ``[prefix + old_h*old_w, C]`` table to ``[prefix + new_h*new_w, C]``.

    Prefix rows (class/register tokens) are kept bit-identical; the patch rows are treated as
    an ``old_h x old_w`` grid (row-major) and resampled bicubically.
    """
    old_grid, new_grid = tuple(old_grid), tuple(new_grid)
    old_h, old_w = old_grid
    if pos.shape[0] != num_prefix_tokens + old_h * old_w:
        raise ValueError(
            f"positional embedding has {pos.shape[0]} rows, expected {num_prefix_tokens} prefix "
            f"+ {old_h}x{old_w} grid"
        )
    if old_grid == new_grid:
        return pos
    prefix, patches = pos[:num_prefix_tokens], pos[num_prefix_tokens:]
    # bicubic is not implemented for half types on CPU, and fp32 avoids rounding in the filter.
    grid = patches.float().reshape(1, old_h, old_w, -1).permute(0, 3, 1, 2)
    # antialias only matters when shrinking; it matches open_clip's resize_pos_embed.
    grid = F.interpolate(grid, size=new_grid, mode="bicubic", antialias=True, align_corners=False)
    patches = grid.permute(0, 2, 3, 1).reshape(new_grid[0] * new_grid[1], -1).to(pos.dtype)
    return torch.cat([prefix, patches], dim=0)


def resize_text_pos_embed(pos: Tensor, new_len: int) -> Tensor:
    """Linearly resample a ``[L, C]`` text table to ``[new_len, C]`` (open_clip's convention)."""
    if pos.shape[0] == new_len:
        return pos
    seq = pos.float().T.unsqueeze(0)  # [1, C, L]: interpolate runs along the last dim
    seq = F.interpolate(seq, size=new_len, mode="linear", antialias=False, align_corners=False)
    return seq[0].T.contiguous().to(pos.dtype)


def _as_pair(value: int | tuple[int, ...]) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    h, w = value
    return int(h), int(w)


def _infer_square_grid(num_patches: int) -> tuple[int, int]:
    side = math.isqrt(num_patches)
    if side * side != num_patches:
        raise ValueError(
            f"cannot infer the checkpoint's patch grid from {num_patches} patch positions (not a "
            "perfect square); pass old_grid=(h, w)"
        )
    return side, side


def grid_of_config(model_cfg: dict | None) -> tuple[int, int] | None:
    """The patch grid an open_clip model config gives its ViT image tower (None: no such tower)."""
    vision = (model_cfg or {}).get("vision_cfg") or {}
    if "timm_model_name" in vision or not vision.get("image_size") or not vision.get("patch_size"):
        return None
    (h, w), (ph, pw) = _as_pair(vision["image_size"]), _as_pair(vision["patch_size"])
    return h // ph, w // pw


def checkpoint_grid(
    state_dict: dict[str, Tensor],
    model: nn.Module,
    configs: Sequence[dict | None],
) -> tuple[int, int] | None:
    """The patch grid of the checkpoint's visual positional embedding, for ``resize_state_dict_pos_embeds``.

    ``configs`` are model configs that may describe the checkpoint, most trusted first (what the
    checkpoint records about itself, then ``--model``'s config before any forced size); the first
    whose grid accounts for the table's rows wins, so 4x6 and 6x4 are told apart.  Without one,
    a table with the model's row count is taken to be at the model's grid, a square count is a
    square grid, and any other count is ambiguous and raises ValueError.  None
    when there is nothing to resize (no visual table, or a tower without a patch grid).
    """
    visual = getattr(model, "visual", None)
    model_pos = getattr(visual, "positional_embedding", None)
    old_pos = state_dict.get(VISUAL_KEY)
    grid_size = getattr(visual, "grid_size", None)
    if old_pos is None or model_pos is None or grid_size is None:
        return None
    new_grid = _as_pair(grid_size)
    rows = old_pos.shape[0] - (model_pos.shape[0] - new_grid[0] * new_grid[1])
    for cfg in configs:
        grid = grid_of_config(cfg)
        if grid is not None and grid[0] * grid[1] == rows:
            return grid
    if rows == new_grid[0] * new_grid[1]:  # nothing says otherwise: already at the model's grid
        return new_grid
    side = math.isqrt(max(rows, 0))
    if side * side == rows:
        return side, side
    shapes = [f"{h}x{rows // h}" for h in range(2, rows) if rows % h == 0][:6]
    raise ValueError(
        f"cannot tell the patch grid of the checkpoint's {VISUAL_KEY}: its {rows} patch positions are not "
        f"a square (they fit {', '.join(shapes) or 'no grid'}) and no model config of the checkpoint records "
        "its image size; use a --model config whose vision_cfg.image_size is the size the checkpoint was "
        "trained at, with --force-image-size for the new one"
    )


def _text_pos_embed(model: nn.Module) -> Tensor | None:
    pos = getattr(model, "positional_embedding", None)
    if pos is None and hasattr(model, "text"):
        pos = getattr(model.text, "positional_embedding", None)
    return pos


def resize_state_dict_pos_embeds(
    state_dict: dict[str, Tensor],
    model: nn.Module,
    old_grid: tuple[int, int] | None = None,
) -> list[str]:
    """Resize, in place, the state dict's position embeddings whose shape differs from ``model``'s.

    ``old_grid`` is the checkpoint's patch grid; a checkpoint does not record it, so without it
    the grid must be square.  The number of prefix tokens is what the model's own table holds
    beyond its grid.  Returns one line per resized table.
    """
    done: list[str] = []
    visual = getattr(model, "visual", None)
    model_pos = getattr(visual, "positional_embedding", None)
    old_pos = state_dict.get(VISUAL_KEY)
    grid_size = getattr(visual, "grid_size", None)
    if old_pos is not None and model_pos is not None and grid_size is not None:
        new_grid = _as_pair(grid_size)
        prefix = model_pos.shape[0] - new_grid[0] * new_grid[1]
        if old_pos.shape[-1] != model_pos.shape[-1]:
            raise ValueError(f"{VISUAL_KEY} width {old_pos.shape[-1]} != model width {model_pos.shape[-1]}")
        # A given old grid can differ from the model's at the same row count (2x3 vs 3x2).
        if old_pos.shape != model_pos.shape or (old_grid is not None and _as_pair(old_grid) != new_grid):
            grid = (
                _as_pair(old_grid) if old_grid is not None else _infer_square_grid(old_pos.shape[0] - prefix)
            )
            state_dict[VISUAL_KEY] = resize_visual_pos_embed(old_pos, grid, new_grid, prefix)
            done.append(
                f"{VISUAL_KEY}: grid {grid[0]}x{grid[1]} -> {new_grid[0]}x{new_grid[1]} ({prefix} prefix)"
            )

    text_pos = _text_pos_embed(model)
    key = next((k for k in TEXT_KEYS if k in state_dict), None)
    if key is not None and text_pos is not None and state_dict[key].shape != text_pos.shape:
        old = state_dict[key]
        if old.shape[-1] != text_pos.shape[-1]:
            raise ValueError(f"{key} width {old.shape[-1]} != model width {text_pos.shape[-1]}")
        state_dict[key] = resize_text_pos_embed(old, text_pos.shape[0])
        done.append(f"{key}: length {old.shape[0]} -> {text_pos.shape[0]}")
    return done
