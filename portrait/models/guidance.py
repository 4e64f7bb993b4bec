"""The guidance-scale embedding of guidance-distilled students (w folded into the UNet).

Following LCM (Luo et al. 2023, §4.1; diffusers' ``get_guidance_scale_embedding``): a sinusoidal embedding
of ``(w - 1) * 1000`` enters the time embedding through ``time_cond_proj_dim`` / ``cond_proj``. Note the
off-by-one between conventions: LCM writes CFG as ``eps_u + (w_lcm)(eps_c - eps_u)`` with ``w_lcm = w - 1``
relative to the usual ``eps_u + w (eps_c - eps_u)``; we always store and pass the *usual* w (teacher's 3.5)
and embed ``w - 1`` so that w=1 ("no guidance") embeds to the zero-frequency point.
"""

from __future__ import annotations

import math

import torch


def guidance_embedding(w: torch.Tensor, dim: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(B,) guidance scales (usual convention) -> (B, dim) sinusoidal embedding of (w - 1) * 1000."""
    if dim % 2:
        raise ValueError(f"guidance embedding dim must be even, got {dim}")
    w = (w.float().flatten() - 1.0) * 1000.0
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=w.device) / (half - 1))
    args = w[:, None] * freqs[None]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1).to(dtype)
