"""The Swin Transformer image body of GLIP: timm's modules with GLIP's pad-before-shift forward.

timm builds and initialises the modules (so key names and random initialisation are timm's); the forward
follows GLIP's ``swint.py``. timm attaches each patch-merging layer to the *next* stage, which is the one
renaming of official keys (see :func:`mmr_medvlm.checkpoint.convert_official_key`). Top to bottom: window
partitioning, the shifted-window mask, a block, a stage, the body returning C3-C5.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mmr_medvlm.config import GLIPConfig


def _partition_windows(x: torch.Tensor, window: int) -> torch.Tensor:
    """``(B, Hp, Wp, C)`` -> ``(B * windows, window**2, C)``, windows row-major within each image."""
    b, hp, wp, c = x.shape
    x = x.view(b, hp // window, window, wp // window, window, c).transpose(2, 3)
    return x.reshape(-1, window * window, c)


def _merge_windows(windows: torch.Tensor, window: int, padded_hw: tuple[int, int]) -> torch.Tensor:
    """The inverse of :func:`_partition_windows`."""
    hp, wp = padded_hw
    c = windows.shape[-1]
    x = windows.view(-1, hp // window, wp // window, window, window, c).transpose(2, 3)
    return x.reshape(-1, hp, wp, c)


def shifted_window_mask(
    padded_hw: tuple[int, int], window: int, shift: int, device: torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The attention mask of the shifted-window blocks of one stage, for its window-padded map (GLIP's
    ``BasicLayer``): after the cyclic shift by ``-shift`` each window may hold pieces of up to 3 x 3 regions
    (row bands ``[0, Hp - window)``, ``[Hp - window, Hp - shift)``, ``[Hp - shift, Hp)``, likewise for
    columns); tokens of different regions get -100 (GLIP's value), the same region 0.

    Returns:
        ``(windows, window**2, window**2)`` with windows in row-major order over the padded map.
    """
    hp, wp = padded_hw
    region = torch.zeros(1, hp, wp, 1, device=device, dtype=dtype)
    bands = ((0, -window), (-window, -shift), (-shift, None))
    for i, (h0, h1) in enumerate(bands):
        for j, (w0, w1) in enumerate(bands):
            region[:, h0:h1, w0:w1, :] = 3 * i + j
    labels = _partition_windows(region, window).squeeze(-1)
    differs = labels.unsqueeze(1) != labels.unsqueeze(2)
    return torch.zeros_like(differs, dtype=dtype).masked_fill(differs, -100.0)


class SwinBlock(nn.Module):
    """One Swin block in GLIP's order (its ``swint.py``): norm1, zero-pad the map to a multiple of the
    window, cyclic shift, window attention (with the stage's shifted-window mask), merge, reverse shift,
    crop, residual; then norm2, MLP, residual.

    timm's block shifts first and pads after, which puts the padding elsewhere in the shifted windows and
    gives other features whenever a stage's map is not a multiple of the window (always, at GLIP's test
    sizes). The parameters are timm's (same names, same initialisation): this block adopts the modules of
    a built ``timm`` ``SwinTransformerBlock`` and replaces only its forward.
    """

    def __init__(self, timm_block: nn.Module) -> None:
        super().__init__()
        self.window = timm_block.window_size[0]
        self.shift = timm_block.shift_size[0]
        self.norm1, self.attn, self.drop_path1 = timm_block.norm1, timm_block.attn, timm_block.drop_path1
        self.norm2, self.mlp, self.drop_path2 = timm_block.norm2, timm_block.mlp, timm_block.drop_path2

    def forward(self, x: torch.Tensor, shift_mask: torch.Tensor | None) -> torch.Tensor:
        """``x``: ``(B, H, W, C)``; ``shift_mask``: :func:`shifted_window_mask` of the padded map (used only
        when this block shifts)."""
        h, w = x.shape[1:3]
        win = self.window
        y = F.pad(self.norm1(x), (0, 0, 0, (-w) % win, 0, (-h) % win))  # padding is zeros after norm1
        hp, wp = y.shape[1:3]
        if self.shift:
            y = torch.roll(y, shifts=(-self.shift, -self.shift), dims=(1, 2))
        windows = self.attn(_partition_windows(y, win), mask=shift_mask if self.shift else None)
        y = _merge_windows(windows, win, (hp, wp))
        if self.shift:
            y = torch.roll(y, shifts=(self.shift, self.shift), dims=(1, 2))
        x = x + self.drop_path1(y[:, :h, :w])
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class SwinStage(nn.Module):
    """timm's stage layout (patch merging of the previous stage first, as ``downsample``) with GLIP's
    forward: one shifted-window mask per stage, built for the window-padded map, shared by its blocks."""

    def __init__(self, timm_stage: nn.Module, window: int) -> None:
        super().__init__()
        self.window, self.shift = window, window // 2
        self.downsample = timm_stage.downsample  # PatchMerging (zero-pads odd sizes as GLIP does) or Identity
        self.blocks = nn.ModuleList(SwinBlock(b) for b in timm_stage.blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        padded = tuple(-(-n // self.window) * self.window for n in x.shape[1:3])
        mask = shifted_window_mask(padded, self.window, self.shift, x.device, x.dtype) if len(self.blocks) > 1 else None
        for block in self.blocks:
            x = block(x, mask)
        return x


class SwinBody(nn.Module):
    """Swin Transformer returning stages 2-4 (C3, C4, C5), each normalised (``norm1..norm3``).

    timm builds and initialises the modules (so key names and random initialisation are timm's); the
    forward follows GLIP's ``swint.py``: the image is zero-padded on the right/bottom to a multiple of the
    patch size, and each block pads before it shifts (:class:`SwinBlock`).
    """

    def __init__(self, cfg: GLIPConfig) -> None:
        super().__init__()
        from timm.models.swin_transformer import SwinTransformer

        # always_partition: like the official Swin, keep 7x7 windows and pad, whatever the input size.
        swin = SwinTransformer(
            img_size=224, embed_dim=cfg.swin_embed_dim, depths=cfg.swin_depths, num_heads=cfg.swin_heads,
            window_size=cfg.swin_window, strict_img_size=False, dynamic_img_size=True, always_partition=True,
            num_classes=0, drop_path_rate=cfg.drop_path_rate,
        )
        self.patch_size = swin.patch_embed.patch_size[0]
        self.patch_embed = swin.patch_embed
        self.layers = nn.ModuleList(SwinStage(stage, cfg.swin_window) for stage in swin.layers)
        dims = [cfg.swin_embed_dim * 2**i for i in range(len(cfg.swin_depths))]
        self.out_channels = dims[1:]
        for i in range(1, len(dims)):
            self.add_module(f"norm{i}", nn.LayerNorm(dims[i]))

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        h, w = images.shape[-2:]
        images = F.pad(images, (0, (-w) % self.patch_size, 0, (-h) % self.patch_size))
        x = self.patch_embed(images)  # NHWC
        outs = []
        for i, stage in enumerate(self.layers):
            x = stage(x)
            if i >= 1:
                outs.append(getattr(self, f"norm{i}")(x).permute(0, 3, 1, 2).contiguous())
        return outs

