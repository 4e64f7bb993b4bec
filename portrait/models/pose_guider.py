"""AniPortrait v2 multi-scale pose guider, built from diffusers blocks.

The parameter names are exactly those of AniPortrait's ``pose_guider.pth`` (see
``shared/fixtures/aniportrait/pose_guider.json``) so that the released file loads strictly.

Architecture (AniPortrait ``src/models/pose_guider.py`` @7f6593f, read for the facts):

* ``conv_layers``: 3->3 conv, then ``num_downsamples`` x [c->c' 4x4 stride-2 conv, c'->c' 3x3 conv] with
  widths 16/32/64, then 64->128 3x3; every conv is followed by BatchNorm + ReLU. Upstream has
  ``num_downsamples=3`` (pose image -> latent resolution, the SD VAE's 8x). The tiny model uses 2 (4x VAE).
* ``final_proj`` (1x1 -> n), times the learned ``scale``: feature 0, at latent resolution.
* ``conv_layers_1..3`` (stride 2) and ``conv_layers_4`` (stride 1), each followed by a transformer
  block ``cross_attn{1..4}``: features 1..4 with channels n, 2n, 4n, 4n.

Two upstream quirks are reproduced in ``mode="faithful"`` (what the weight import uses):

1. ``cross_attn*`` are self-attention: upstream passes the reference-pose features as
   ``encoder_hidden_states`` but the blocks have no ``attn2``, so the reference pose has no effect.
   We therefore do not compute the reference-pose branch at all (same outputs, less work).
2. Upstream never calls ``.eval()`` on the pose guider, so BatchNorm always normalises with the
   statistics of the current call's batch: all frames of the window of the one video it animates.
   ``faithful`` forces that, with statistics taken per video (identical for upstream's batch of one video;
   see :func:`_video_batch_norm`).

``mode="clean"`` uses ordinary train/eval BatchNorm semantics (running statistics at inference),
which makes a frame's features independent of the other frames in its window.
"""

from __future__ import annotations

import torch
from diffusers import Transformer2DModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

POSE_GUIDER_MODES = ("faithful", "clean")


def _conv_bn_relu(c_in: int, c_out: int, kernel: int, stride: int, padding: int) -> list[nn.Module]:
    return [
        nn.Conv2d(c_in, c_out, kernel_size=kernel, stride=stride, padding=padding),
        nn.BatchNorm2d(c_out),
        nn.ReLU(),
    ]


def _video_batch_norm(x: torch.Tensor, batch: int, bn: nn.BatchNorm2d) -> torch.Tensor:
    """Upstream quirk 2 (BatchNorm in train mode at inference), with statistics per *video*.

    Upstream always runs the guider on one video, (F, C, H, W), so its batch statistics are those of that video's
    frames. Taking statistics per video in a batch of B videos reproduces that exactly for B=1 and makes training
    independent of how samples are grouped into batches and processes (so 2-process DDP equals 1 process).
    Running statistics are never updated (upstream's inference never reads them).

    x: (B*F, C, H, W) -> same shape.
    """
    n, c, h, w = x.shape
    v = x.float().reshape(batch, n // batch, c, h, w)
    mean = v.mean(dim=(1, 3, 4), keepdim=True)
    var = v.var(dim=(1, 3, 4), keepdim=True, unbiased=False)
    y = (v - mean) * torch.rsqrt(var + bn.eps)
    y = y * bn.weight.view(1, 1, c, 1, 1) + bn.bias.view(1, 1, c, 1, 1)
    return y.reshape(n, c, h, w).to(x.dtype)


class PoseGuider(ModelMixin, ConfigMixin):
    """Pose image -> 5 feature maps for the denoising UNet.

    Args:
        noise_latent_channels: n, the UNet's first block width (320 for SD1.5).
        conditioning_channels: channels of the pose image (3).
        num_downsamples: stride-2 stages in ``conv_layers`` = log2 of the VAE's spatial factor.
        attention_heads / attention_head_dim: the transformer blocks' inner width. Upstream hard-codes
            16 x 88 = 1408 at every scale; the tiny model makes it small.
        mode: ``"faithful"`` or ``"clean"`` (see module docstring).
        channel_mult: UNet block widths / n. Upstream (SD1.5) is (1, 2, 4, 4) -> features n, n, 2n, 4n, 4n;
            the tiny model uses (1, 2, 2, 2) to stay small.
    """

    _supports_gradient_checkpointing = False

    @register_to_config
    def __init__(
        self,
        noise_latent_channels: int = 320,
        conditioning_channels: int = 3,
        num_downsamples: int = 3,
        attention_heads: int = 16,
        attention_head_dim: int = 88,
        mode: str = "faithful",
        channel_mult: tuple[int, ...] = (1, 2, 4, 4),
        norm_num_groups: int = 32,
    ):
        super().__init__()
        if mode not in POSE_GUIDER_MODES:
            raise ValueError(f"pose guider mode must be one of {POSE_GUIDER_MODES}, got {mode!r}")
        if not 1 <= num_downsamples <= 3:
            raise ValueError(f"num_downsamples must be 1..3 (VAE factor 2..8), got {num_downsamples}")
        n = noise_latent_channels
        if len(channel_mult) != 4 or channel_mult[0] != 1:
            raise ValueError(f"channel_mult must have 4 entries starting with 1 (UNet block widths / n), got {channel_mult}")
        c1, c2, c3 = (n * m for m in channel_mult[1:])
        widths = [16, 32, 64][:num_downsamples]
        layers = _conv_bn_relu(conditioning_channels, conditioning_channels, 3, 1, 1)
        c = conditioning_channels
        for w in widths:
            layers += _conv_bn_relu(c, w, 4, 2, 1)
            layers += _conv_bn_relu(w, w, 3, 1, 1)
            c = w
        layers += _conv_bn_relu(c, 128, 3, 1, 1)
        self.conv_layers = nn.Sequential(*layers)
        self.final_proj = nn.Conv2d(128, n, kernel_size=1)
        self.conv_layers_1 = nn.Sequential(*_conv_bn_relu(n, n, 3, 1, 1), *_conv_bn_relu(n, n, 3, 2, 1))
        self.conv_layers_2 = nn.Sequential(*_conv_bn_relu(n, n, 3, 1, 1), *_conv_bn_relu(n, c1, 3, 2, 1))
        self.conv_layers_3 = nn.Sequential(*_conv_bn_relu(c1, c1, 3, 1, 1), *_conv_bn_relu(c1, c2, 3, 2, 1))
        self.conv_layers_4 = nn.Sequential(*_conv_bn_relu(c2, c3, 3, 1, 1))
        for i, ch in enumerate([n, c1, c2, c3], start=1):
            # diffusers' Transformer2DModel with cross_attention_dim=None has exactly upstream's keys:
            # norm, proj_in (1x1 conv), transformer_blocks.0.{norm1,attn1,norm3,ff}, proj_out.
            block = Transformer2DModel(
                num_attention_heads=attention_heads,
                attention_head_dim=attention_head_dim,
                in_channels=ch,
                norm_num_groups=norm_num_groups,
                cross_attention_dim=None,
                activation_fn="geglu",
                attention_bias=False,
            )
            setattr(self, f"cross_attn{i}", block)
        self.scale = nn.Parameter(torch.ones(1) * 2)
        self._initialize_weights()

    def _initialize_weights(self) -> None:
        # He init on every conv and a zero final projection, as upstream: an untrained guider adds nothing
        # to the UNet at feature 0, so a fresh model starts as the plain SD UNet.
        for seq in (self.conv_layers, self.conv_layers_1, self.conv_layers_2, self.conv_layers_3, self.conv_layers_4):
            for m in seq:
                if isinstance(m, nn.Conv2d):
                    fan_in = m.kernel_size[0] * m.kernel_size[1] * m.in_channels
                    nn.init.normal_(m.weight, std=(2.0 / fan_in) ** 0.5)
                    nn.init.zeros_(m.bias)
        nn.init.zeros_(self.final_proj.weight)
        nn.init.zeros_(self.final_proj.bias)

    @property
    def feature_channels(self) -> list[int]:
        n = self.config.noise_latent_channels
        return [n] + [n * m for m in self.config.channel_mult]

    def _run(self, seq: nn.Sequential, x: torch.Tensor, batch: int) -> torch.Tensor:
        if self.config.mode != "faithful":
            return seq(x)
        for m in seq:
            if isinstance(m, nn.BatchNorm2d):
                x = _video_batch_norm(x, batch, m)
            else:
                x = m(x)
        return x

    def forward(self, pose: torch.Tensor, ref_pose: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Compute the 5 pose feature maps.

        Args:
            pose: (B, 3, F, H, W) pose images in [-1, 1].
            ref_pose: (B, 3, H, W) reference pose; accepted for API parity and ignored (quirk 1).

        Returns:
            5 tensors (B*F, C_i, H_i, W_i), frames flattened batch-major as the UNet's ``(b f)`` layout,
            with C = [n, n, 2n, 4n, 4n] and strides 2**num_downsamples * [1, 2, 4, 8, 8].
        """
        if pose.ndim != 5:
            raise ValueError(f"pose must be (B, 3, F, H, W), got shape {tuple(pose.shape)}")
        b, c, f, h, w = pose.shape
        x = pose.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)
        x = self.final_proj(self._run(self.conv_layers, x, b)) * self.scale
        feats = [x]
        for i in range(1, 5):
            x = self._run(getattr(self, f"conv_layers_{i}"), x, b)
            x = getattr(self, f"cross_attn{i}")(x).sample
            feats.append(x)
        return feats
