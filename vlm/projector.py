"""Vision-to-language projector: LLaVA-1.5's two-layer GELU MLP (Liu et al. 2023, "Improved
Baselines with Visual Instruction Tuning", Sec. 3.2), with optional pixel shuffle (nanoVLM,
Idefics3) to cut the number of image tokens by s^2, and optional learned row and column
embeddings added to its output (``projector.grid_position``): each image token then carries its
place on the patch grid explicitly, beside whatever the vision tower's own position embedding
left in its features. transformers' LLaVA has neither, so a model with them does not export.

The layer names match transformers' ``LlavaMultiModalProjector`` so an export is a rename-free
copy of these weights.
"""

from __future__ import annotations

import torch
from torch import nn


def pixel_shuffle(x: torch.Tensor, s: int) -> torch.Tensor:
    """(N, G*G, D) patch tokens on a G x G grid -> (N, (G/s)^2, D*s^2), merging s x s blocks."""
    if s == 1:
        return x
    n, t, d = x.shape
    g = int(round(t**0.5))
    if g * g != t or g % s:
        raise ValueError(f"pixel_shuffle: expected a square grid divisible by {s}, got {t} tokens")
    x = x.view(n, g // s, s, g // s, s, d)  # (N, gh, s, gw, s, D)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(n, (g // s) ** 2, s * s * d)
    return x


class Projector(nn.Module):
    """(N, T, D_vision) -> (N, T / s^2, D_decoder).

    Args:
        in_dim: vision feature width.
        out_dim: decoder hidden size.
        hidden_dim: the MLP's hidden width (LLaVA uses ``out_dim``).
        shuffle: pixel-shuffle factor s (1 = none).
        grid: the side of the output token grid (G/s) when each token gets a learned row and
            column embedding added; 0 = none.
    """

    def __init__(self, *, in_dim: int, out_dim: int, hidden_dim: int | None = None, shuffle: int = 1, grid: int = 0) -> None:
        super().__init__()
        self.shuffle = shuffle
        self.grid = grid
        hidden_dim = hidden_dim or out_dim
        self.linear_1 = nn.Linear(in_dim * shuffle * shuffle, hidden_dim)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(hidden_dim, out_dim)
        if grid:
            self.row_embed = nn.Parameter(torch.randn(grid, out_dim) * 0.02)  # (G', D_dec)
            self.col_embed = nn.Parameter(torch.randn(grid, out_dim) * 0.02)  # (G', D_dec)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = pixel_shuffle(features, self.shuffle)  # (N, T/s^2, D*s^2)
        x = self.linear_2(self.act(self.linear_1(x)))  # (N, T/s^2, D_dec)
        if self.grid:
            if x.shape[1] != self.grid * self.grid:
                raise ValueError(f"expected {self.grid}x{self.grid} = {self.grid * self.grid} image tokens for the grid embedding, got {x.shape[1]}")
            pos = (self.row_embed[:, None, :] + self.col_embed[None, :, :]).reshape(-1, x.shape[-1])  # (G'*G', D_dec), raster order
            x = x + pos.to(x.dtype)
        return x
