"""Reference attention, per-frame motion GroupNorm and pose-feature injection for diffusers UNets.

Everything here attaches to stock diffusers modules through their public extension points
(attention processors, forward hooks, module replacement with identical parameters) and never renames
a weight, so the UNets keep saving and loading as plain diffusers models.

Reference attention (AniPortrait / MagicAnimate "ReferenceNet"):
    The reference UNet runs once per video at t=0 on the reference latents. Each spatial self-attention
    (``attn1`` of every ``transformer_blocks.N`` under ``*.attentions.*``) records the normed hidden states it
    receives: the *bank*, keyed by module path. In the denoising UNet, the ``attn1`` at the same module path
    attends to ``concat(own tokens, bank tokens)`` as keys and values, the bank broadcast over frames.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from torch import nn

SPATIAL_SELF_ATTN_SUFFIX = "attn1.processor"


def is_spatial_self_attention(processor_name: str) -> bool:
    """True for spatial ``attn1`` processors (motion-module attentions are ``*.motion_modules.*``)."""
    return (
        ".attentions." in processor_name
        and processor_name.endswith(SPATIAL_SELF_ATTN_SUFFIX)
        and ".motion_modules." not in processor_name
    )


def _bank_key(processor_name: str) -> str:
    # "down_blocks.0.attentions.1.transformer_blocks.0.attn1.processor" -> module path without ".processor"
    return processor_name[: -len(".processor")]


class ReferenceBank:
    """Holds the reference features for one video and the read/write state.

    ``tokens[path]``: (B_ref, N, C) normed attn1 inputs of the reference UNet.
    ``active``: optional (B,) bool; samples with ``False`` use plain self-attention (upstream gives the
    unconditional CFG half no reference, see ``ReferenceAttention.read``).
    """

    def __init__(self) -> None:
        self.tokens: dict[str, torch.Tensor] = {}
        self.writing = False
        self.reading = False
        self.num_frames = 1
        self.active: torch.Tensor | None = None

    def clear(self) -> None:
        self.tokens = {}
        self.active = None


def _attention(attn: Attention, query_states: torch.Tensor, kv_states: torch.Tensor) -> torch.Tensor:
    """Plain multi-head SDPA attention of ``attn`` with separate query and key/value token sets.

    query_states: (B, Nq, C); kv_states: (B, Nk, C) -> (B, Nq, C_out). Uses ``attn.scale`` explicitly so
    that a pruned head_dim keeps the scale it was trained with (1/sqrt(original head_dim)).
    """
    b = query_states.shape[0]
    q = attn.to_q(query_states)
    k = attn.to_k(kv_states)
    v = attn.to_v(kv_states)
    head_dim = k.shape[-1] // attn.heads
    q = q.view(b, -1, attn.heads, head_dim).transpose(1, 2)
    k = k.view(b, -1, attn.heads, head_dim).transpose(1, 2)
    v = v.view(b, -1, attn.heads, head_dim).transpose(1, 2)
    out = F.scaled_dot_product_attention(q, k, v, scale=attn.scale)
    out = out.transpose(1, 2).reshape(b, -1, attn.heads * head_dim).to(q.dtype)
    out = attn.to_out[0](out)
    return attn.to_out[1](out)


class ReferenceWriteProcessor:
    """attn1 processor for the reference UNet: records its input in the bank, then self-attends."""

    def __init__(self, bank: ReferenceBank, key: str) -> None:
        self.bank = bank
        self.key = key

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        if self.bank.writing:
            self.bank.tokens[self.key] = hidden_states
        return _attention(attn, hidden_states, hidden_states) / attn.rescale_output_factor


class ReferenceReadProcessor:
    """attn1 processor for the denoising UNet: keys/values = concat(own tokens, bank tokens of this block).

    With no bank entry (reading off, or the bank emptied) it is exactly self-attention, so the denoising
    UNet then equals a UNet without reference attention.
    """

    def __init__(self, bank: ReferenceBank, key: str) -> None:
        self.bank = bank
        self.key = key

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        ref = self.bank.tokens.get(self.key) if self.bank.reading else None
        if ref is None:
            return _attention(attn, hidden_states, hidden_states) / attn.rescale_output_factor
        f = self.bank.num_frames
        # (B_ref, N, C) -> (B_ref*F, N, C), batch-major to match the UNet's (b f) layout.
        ref = ref.to(hidden_states.dtype).repeat_interleave(f, dim=0)
        if ref.shape[0] != hidden_states.shape[0]:
            raise RuntimeError(
                f"reference bank batch {ref.shape[0] // f} x {f} frames does not match the UNet batch "
                f"{hidden_states.shape[0]} at {self.key}"
            )
        active = self.bank.active
        if active is None or bool(active.all()):
            out = _attention(attn, hidden_states, torch.cat([hidden_states, ref], dim=1))
        else:
            rows = active.repeat_interleave(f)
            out = _attention(attn, hidden_states, hidden_states)
            if bool(rows.any()):
                h_on = hidden_states[rows]
                out[rows] = _attention(attn, h_on, torch.cat([h_on, ref[rows]], dim=1))
        return out / attn.rescale_output_factor


class PerFrameGroupNorm(nn.GroupNorm):
    """GroupNorm over each frame separately for 5-D (B, C, F, H, W) input.

    AniPortrait (like the original AnimateDiff) normalises motion-module input on ``(b f) c h w``;
    diffusers' ``AnimateDiffTransformer3D`` normalises the 5-D tensor, pooling statistics over frames.
    Same parameters (``weight``, ``bias``), so no key changes.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 5:
            return super().forward(x)
        b, c, f, h, w = x.shape
        y = x.transpose(1, 2).reshape(b * f, c, h, w)
        y = F.group_norm(y, self.num_groups, self.weight, self.bias, self.eps)
        return y.reshape(b, f, c, h, w).transpose(1, 2)


def make_motion_norms_per_frame(unet: nn.Module) -> int:
    """Swap every motion-module ``norm`` (GroupNorm) for a :class:`PerFrameGroupNorm` sharing its parameters.

    Returns the number of norms replaced.
    """
    count = 0
    for name, module in unet.named_modules():
        if not name.split(".")[-1].isdigit() or ".motion_modules." not in f".{name}":
            continue
        norm = getattr(module, "norm", None)
        if isinstance(norm, nn.GroupNorm) and not isinstance(norm, PerFrameGroupNorm):
            new = PerFrameGroupNorm(norm.num_groups, norm.num_channels, norm.eps, norm.affine)
            new.weight, new.bias = norm.weight, norm.bias
            module.norm = new
            count += 1
    return count


class PoseInjection:
    """Adds pose-guider features inside the denoising UNet (DESIGN §1) with forward hooks.

    * feature 0 is added to the output of ``conv_in``; it is therefore part of the first skip residual.
    * feature i (1..4) is added to the hidden state returned by down block i-1, *not* to the skips
      that block recorded.
    """

    def __init__(self, unet: nn.Module) -> None:
        self.features: Sequence[torch.Tensor] | None = None
        self.handles = [unet.conv_in.register_forward_hook(self._conv_in_hook)]
        for i, block in enumerate(unet.down_blocks):
            self.handles.append(block.register_forward_hook(self._make_down_hook(i + 1)))

    def _conv_in_hook(self, module, inputs, output):
        if self.features is None:
            return output
        return output + self.features[0].to(output.dtype)

    def _make_down_hook(self, index: int):
        def hook(module, inputs, output):
            if self.features is None:
                return output
            sample, skips = output
            return sample + self.features[index].to(sample.dtype), skips

        return hook

    @contextlib.contextmanager
    def use(self, features: Sequence[torch.Tensor] | None) -> Iterator[None]:
        """Inject ``features`` (5 tensors (B*F, C_i, H_i, W_i)) for the calls inside this block."""
        previous = self.features
        self.features = features
        try:
            yield
        finally:
            self.features = previous


class ReferenceAttention:
    """Installs write processors on the reference UNet and read processors on the denoising UNet."""

    def __init__(self, reference_unet: nn.Module, denoising_unet: nn.Module) -> None:
        self.bank = ReferenceBank()
        self.install(reference_unet, write=True)
        self.install(denoising_unet, write=False)

    def install(self, unet: nn.Module, write: bool) -> None:
        # set_attn_processor needs a processor for every attention layer (DESIGN §4): keep stock SDPA
        # for the others (cross-attention, motion modules).
        processors = {}
        for name in unet.attn_processors:
            if is_spatial_self_attention(name):
                cls = ReferenceWriteProcessor if write else ReferenceReadProcessor
                processors[name] = cls(self.bank, _bank_key(name))
            else:
                processors[name] = AttnProcessor2_0()
        unet.set_attn_processor(processors)

    @contextlib.contextmanager
    def write(self) -> Iterator[ReferenceBank]:
        self.bank.clear()
        self.bank.writing = True
        try:
            yield self.bank
        finally:
            self.bank.writing = False

    @contextlib.contextmanager
    def read(self, tokens: dict[str, torch.Tensor] | None, num_frames: int, active: torch.Tensor | None = None) -> Iterator[None]:
        """Read ``tokens`` (a bank snapshot) for the denoising calls inside this block.

        ``tokens=None`` or ``{}`` gives plain self-attention everywhere.
        """
        prev = (self.bank.tokens, self.bank.reading, self.bank.num_frames, self.bank.active)
        self.bank.tokens = dict(tokens or {})
        self.bank.reading = True
        self.bank.num_frames = num_frames
        self.bank.active = active
        try:
            yield
        finally:
            self.bank.tokens, self.bank.reading, self.bank.num_frames, self.bank.active = prev
