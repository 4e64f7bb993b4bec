"""The frame interpolator, keyframe selection and keyframed pipeline (issue 6): fast, tiny, CPU."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from infer.keyframes import (
    KeyframeSpecError,
    adaptive_keyframes,
    fixed_keyframes,
    interpolation_error,
    keyframes_for_budget,
    parse_keyframes,
    select_keyframes,
)
from portrait.interpolation import MIRROR_68, landmark_consistency, mirror_landmarks
from portrait.models.interpolator import (
    FrameInterpolator,
    InterpolatorFolderError,
    LinearBlend,
    build_interpolator,
    fill_between_keyframes,
    fuse,
    landmark_flow_prior,
)


def _randomise(net: FrameInterpolator, seed: int = 0, scale: float = 0.05) -> FrameInterpolator:
    """Give every zero-initialised tensor small random values, so no test passes because outputs are zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            if p.abs().max() == 0:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    return net


def _inputs(b=3, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    img0, img1 = torch.rand(b, 3, size, size, generator=g), torch.rand(b, 3, size, size, generator=g)
    poses = [torch.rand(b, 3, size, size, generator=g) for _ in range(3)]
    lmk = torch.rand(3, b, 68, 2, generator=g) * size
    return img0, img1, poses, lmk


def _face_landmarks(n: int, mouth: np.ndarray | None = None) -> np.ndarray:
    """A synthetic (n, 68, 2) track: a fixed face whose inner/outer lower lip moves by ``mouth`` pixels."""
    rng = np.random.default_rng(0)
    base = rng.uniform(16, 48, size=(68, 2))
    base[36:42] = [20, 24] + rng.normal(0, 1, (6, 2))
    base[42:48] = [44, 24] + rng.normal(0, 1, (6, 2))
    out = np.repeat(base[None], n, 0)
    if mouth is not None:
        out[:, 55:60, 1] += mouth[:, None]
        out[:, 65:68, 1] += mouth[:, None]
    return out


# ---------------------------------------------------------------------------------------------------------------------
# the model
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["tiny", "tiny_fast"])
@pytest.mark.parametrize("use_landmarks", [True, False])
def test_t0_and_t1_return_the_keyframes(use_landmarks, arch):
    net = _randomise(build_interpolator(arch)).eval()
    img0, img1, (p0, p1, _), (l0, l1, _) = _inputs()
    b = img0.shape[0]
    with torch.no_grad():
        out0 = net(img0, img1, torch.zeros(b), p0, p1, p0, l0, l1, l0, use_landmarks=use_landmarks)
        out1 = net(img0, img1, torch.ones(b), p0, p1, p1, l0, l1, l1, use_landmarks=use_landmarks)
        mid = net(img0, img1, torch.full((b,), 0.5), p0, p1, p0, l0, l1, l0, use_landmarks=use_landmarks)
    torch.testing.assert_close(out0["frame"], img0, atol=1e-4, rtol=0)
    torch.testing.assert_close(out1["frame"], img1, atol=1e-4, rtol=0)
    assert (mid["frame"] - img0).abs().max() > 1e-2  # the middle really is something else
    assert mid["flow"].abs().max() > 0  # the randomised network predicts non-zero flow


@pytest.mark.parametrize(("shape", "size"), [((3, 2, 16, 16), (64, 64)), ((3, 5, 8, 8), (16, 16)), ((3, 4, 16, 16), (8, 8)),
                                           ((2, 3, 64, 64), (16, 16)), ((2, 3, 64, 48), (32, 24)), ((1, 2, 12, 20), (30, 50))])
def test_resize_matmuls_equal_avg_pool_and_bilinear(shape, size):
    # On a CPU at small sides the interpolator resizes with two matmuls; they must be avg_pool2d / bilinear exactly
    from portrait.models.interpolator import _to_size

    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    h, w = shape[-2:]
    shrink = h % size[0] == 0 and w % size[1] == 0 and h // size[0] == w // size[1]
    want = F.avg_pool2d(x, h // size[0]) if shrink else F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    torch.testing.assert_close(_to_size(x, size), want, atol=1e-5, rtol=0)


def test_tiny_fast_has_no_full_resolution_block():
    net = build_interpolator("tiny_fast")
    assert net.config.scales == [4, 2, 2] and net.config.downs == [4, 4, 2] and net.multiple == 16
    # the same parameters as tiny (only strides differ), on the same 16x16 coarse grid at 64 px
    assert [p.shape for p in net.parameters()] == [p.shape for p in build_interpolator("tiny").parameters()]
    seen = []
    hooks = [b.conv0.register_forward_hook(lambda m, i, o: seen.append((i[0].shape[-1], o.shape[-1]))) for b in net.blocks]
    img0, img1, (p0, p1, pt), (l0, l1, lt) = _inputs(size=64)
    net.interpolate(img0, img1, torch.full((3,), 0.5), p0, p1, pt, l0, l1, lt)
    for h in hooks:
        h.remove()
    assert seen == [(16, 4), (32, 8), (32, 16)]
    with pytest.raises(ValueError, match="one entry per block"):
        build_interpolator("tiny", downs=[4, 2])


def test_zero_flow_with_mask_half_is_the_blend():
    img0, img1, _, _ = _inputs()
    b = img0.shape[0]
    t = torch.tensor([0.25, 0.5, 0.75])
    out = fuse(img0, img1, torch.zeros(b, 4, 32, 32), torch.full((b, 1, 32, 32), 0.5), t)
    torch.testing.assert_close(out, (1 - t.view(-1, 1, 1, 1)) * img0 + t.view(-1, 1, 1, 1) * img1, atol=1e-5, rtol=0)
    # and a non-neutral mask is not the blend
    out2 = fuse(img0, img1, torch.zeros(b, 4, 32, 32), torch.full((b, 1, 32, 32), 0.9), t)
    assert (out2 - out).abs().max() > 1e-2


def test_untrained_interpolator_is_the_blend():
    # zero-initialised heads: a fresh model starts exactly at the linear-blend baseline
    net = build_interpolator("tiny").eval()
    img0, img1, (p0, p1, pt), (l0, l1, lt) = _inputs()
    t = torch.tensor([0.25, 0.5, 0.75])
    out = net.interpolate(img0, img1, t, p0, p1, pt, l0, l1, lt)
    torch.testing.assert_close(out, LinearBlend().interpolate(img0, img1, t), atol=1e-5, rtol=0)


def test_landmark_inputs_zero_init_on_equals_off():
    torch.manual_seed(0)
    net = build_interpolator("tiny")
    # randomise everything except the zero-initialised landmark branch output and the prior gain
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "landmark_in.2" not in name and name != "prior_gain" and p.abs().max() == 0:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    img0, img1, (p0, p1, pt), (l0, l1, lt) = _inputs()
    t = torch.tensor([0.3, 0.5, 0.6])
    on = net.interpolate(img0, img1, t, p0, p1, pt, l0, l1, lt, use_landmarks=True)
    off = net.interpolate(img0, img1, t, use_landmarks=False)
    torch.testing.assert_close(on, off, atol=0, rtol=0)
    # once the branch has weights, the landmarks change the output (the test can fail)
    _randomise(net, seed=2)
    on2 = net.interpolate(img0, img1, t, p0, p1, pt, l0, l1, lt, use_landmarks=True)
    off2 = net.interpolate(img0, img1, t, use_landmarks=False)
    assert (on2 - off2).abs().max() > 1e-3


@pytest.mark.parametrize("arch", ["tiny", "base"])
def test_per_sample_landmark_switch_equals_the_global_switch(arch):
    # Training drops the landmarks per sample with a (B,) tensor; inference passes a bool and skips the gate. Both
    # paths must agree sample by sample, for the tiny config and for base's deeper pyramid (scales 8/4/2).
    net = _randomise(build_interpolator(arch, **({"widths": [16, 16, 16], "depth": 1} if arch == "base" else {})), scale=0.02).eval()
    img0, img1, (p0, p1, pt), (l0, l1, lt) = _inputs(b=4, size=64)
    t = torch.tensor([0.25, 0.5, 0.5, 0.75])
    switch = torch.tensor([True, False, True, False])
    with torch.no_grad():
        mixed = net.interpolate(img0, img1, t, p0, p1, pt, l0, l1, lt, use_landmarks=switch)
        on = net.interpolate(img0, img1, t, p0, p1, pt, l0, l1, lt, use_landmarks=True)
        off = net.interpolate(img0, img1, t, p0, p1, pt, l0, l1, lt, use_landmarks=False)
    torch.testing.assert_close(mixed[switch], on[switch], atol=1e-5, rtol=0)
    torch.testing.assert_close(mixed[~switch], off[~switch], atol=1e-5, rtol=0)
    assert (on - off).abs().max() > 1e-3  # the landmarks matter, so a gate that does nothing fails above


def test_flow_prior_and_landmark_consistency():
    # target landmarks shifted by (+2, -1) px from keyframe 0: the prior near the face is the displacement back
    lt = torch.full((1, 68, 2), 16.0) + torch.randn(1, 68, 2)
    l0, l1 = lt - torch.tensor([2.0, -1.0]), lt + torch.tensor([1.0, 0.0])
    prior = landmark_flow_prior(lt, l0, l1, (32, 32), 0.06)
    c = prior[0, :, 16, 16]
    torch.testing.assert_close(c[:4], torch.tensor([-2.0, 1.0, 1.0, 0.0]), atol=1e-4, rtol=0)
    assert c[4] > 0.9
    assert prior[0, 4, 0, 31] < 1e-3  # no confidence far away
    assert landmark_flow_prior(lt, lt, lt, (32, 32), 0.06)[:, :4].abs().max() == 0
    # the exact flow has zero landmark-consistency loss, zero flow does not
    flow = prior[:, :4]
    assert float(landmark_consistency(flow, lt, l0, l1)) < 1e-3
    assert float(landmark_consistency(torch.zeros_like(flow), lt, l0, l1)) > 0.01


def _dense_prior(lmk_t, lmk0, lmk1, size, sigma):
    """The prior's definition written out densely: (pixels x 68) Gaussian weights, Nadaraya-Watson average."""
    h, w = size
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    grid = torch.stack([xs, ys], -1).reshape(-1, 2) + 0.5
    d2 = (grid[None, :, None] - lmk_t.double()[:, None]).pow(2).sum(-1)
    wgt = torch.exp(-d2 / (2 * (sigma * h) ** 2))
    total = wgt.sum(-1, keepdim=True)
    disp = torch.cat([lmk0 - lmk_t, lmk1 - lmk_t], -1).double()
    flow = (wgt @ disp) / total.clamp(min=1e-6) * (total > 1e-6)
    return torch.cat([flow, 1 - torch.exp(-total)], -1).transpose(1, 2).reshape(-1, 5, h, w)


@pytest.mark.parametrize("size", [(16, 16), (24, 32)])
def test_separable_prior_equals_the_dense_definition(size):
    g = torch.Generator().manual_seed(0)
    lt = torch.rand(3, 68, 2, generator=g) * torch.tensor([size[1], size[0]])
    l0, l1 = lt + torch.randn(3, 68, 2, generator=g), lt + torch.randn(3, 68, 2, generator=g)
    ref = _dense_prior(lt, l0, l1, size, 0.06)
    torch.testing.assert_close(landmark_flow_prior(lt, l0, l1, size, 0.06).double(), ref, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(landmark_flow_prior(lt.double(), l0.double(), l1.double(), size, 0.06), ref, atol=1e-9, rtol=1e-9)


def test_mirror_permutation_is_an_involution_and_flips_eyes():
    assert np.array_equal(MIRROR_68[MIRROR_68], np.arange(68))
    lmk = torch.from_numpy(_face_landmarks(1)).float()
    m = mirror_landmarks(lmk, 64)
    torch.testing.assert_close(mirror_landmarks(m, 64), lmk)
    # the subject's right eye (36-41, image left) stays on the image left after the flip
    assert m[0, 36:42, 0].mean() < m[0, 42:48, 0].mean()


def test_save_load_roundtrip_and_errors(tmp_path, tiny_model_dir):
    net = _randomise(build_interpolator("tiny", depth=1))
    path = net.save_pretrained(tmp_path / "interp", metadata={"steps": 3})
    assert {p.name for p in path.iterdir()} == {"config.json", "model.safetensors", "README.md"}
    loaded = FrameInterpolator.from_pretrained(path)
    assert loaded.config == net.config and loaded.metadata["steps"] == 3
    for k, v in net.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k])
    net.save_pretrained(path)  # replacing an interpolator folder is fine
    old = tmp_path / "old"
    net.save_pretrained(old)
    info = json.loads((old / "config.json").read_text())
    (old / "config.json").write_text(json.dumps({**info, "format_version": 1}))  # flows accumulated at full resolution
    with pytest.raises(InterpolatorFolderError, match="format 1.*retrain"):
        FrameInterpolator.from_pretrained(old)
    with pytest.raises(InterpolatorFolderError, match="not found"):
        FrameInterpolator.from_pretrained(tmp_path / "missing")
    with pytest.raises(InterpolatorFolderError, match="Pose2Video model folder"):
        FrameInterpolator.from_pretrained(tiny_model_dir)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.txt").write_text("x")
    with pytest.raises(FileExistsError):
        net.save_pretrained(tmp_path / "other")


def test_base_config_size_and_macs():
    from portrait.models.interpolator import count_macs, count_parameters

    net = build_interpolator("base")
    assert 4e6 < count_parameters(net) < 8e6
    assert count_macs(net, 512) < 10e9
    assert count_macs(build_interpolator("tiny"), 64) < 0.1e9


# ---------------------------------------------------------------------------------------------------------------------
# keyframes
# ---------------------------------------------------------------------------------------------------------------------


def test_parse_specs():
    assert parse_keyframes("none").mode == "none"
    assert parse_keyframes("fixed:3").interval == 3
    s = parse_keyframes("adaptive:0.05")
    assert s.mode == "adaptive" and s.eps == 0.05 and s.max_gap == 4
    assert parse_keyframes("adaptive:0.1:max_gap=6").max_gap == 6
    assert str(parse_keyframes("fixed:3")) == "fixed:3"
    for bad in ("fixd:3", "fixed:", "fixed:0", "adaptive", "adaptive:x", "3"):
        with pytest.raises(KeyframeSpecError, match="keyframe spec"):
            parse_keyframes(bad)


@pytest.mark.parametrize("n,k", [(10, 3), (16, 3), (7, 4), (2, 3), (1, 2)])
def test_fixed_keeps_first_and_last(n, k):
    keys = fixed_keyframes(n, k)
    assert keys[0] == 0 and keys[-1] == n - 1 and keys == sorted(set(keys))
    assert max(np.diff(keys), default=1) <= k


def test_adaptive_keeps_ends_respects_gap_and_eps():
    n = 30
    still = _face_landmarks(n)
    keys = adaptive_keyframes(still, eps=0.05, max_gap=4)
    assert keys[0] == 0 and keys[-1] == n - 1
    assert max(np.diff(keys)) <= 4  # the cap, even for a still face
    keys7 = adaptive_keyframes(still, eps=0.05, max_gap=7)
    assert len(keys7) < len(keys)
    # a talking mouth: keyframes at the mouth extremes, and every skipped frame within eps
    mouth = 4 * np.sin(np.arange(n) / 3.0)
    talk = _face_landmarks(n, mouth)
    keys = adaptive_keyframes(talk, eps=0.01, max_gap=8)
    assert keys[0] == 0 and keys[-1] == n - 1 and max(np.diff(keys)) <= 8
    for a, b in zip(keys[:-1], keys[1:]):
        assert (interpolation_error(talk, a, b) <= 0.01 + 1e-9).all()
    peaks = [i for i in range(1, n - 1) if (mouth[i] > mouth[i - 1] and mouth[i] > mouth[i + 1]) or (mouth[i] < mouth[i - 1] and mouth[i] < mouth[i + 1])]
    assert set(peaks) <= set(keys)
    # a looser eps needs fewer keyframes
    assert len(adaptive_keyframes(talk, eps=0.2, max_gap=8)) <= len(keys)


def test_budget_selection_has_exact_count():
    talk = _face_landmarks(16, 4 * np.sin(np.arange(16) / 2.0))
    for count in (4, 6, 9):
        keys = keyframes_for_budget(talk, count, max_gap=4)
        assert len(keys) == count and keys[0] == 0 and keys[-1] == 15


def test_select_adaptive_without_landmarks_is_a_clear_error():
    with pytest.raises(KeyframeSpecError, match="landmarks"):
        select_keyframes("adaptive:0.05", 10)
    assert select_keyframes("none", 4) == [0, 1, 2, 3]


def test_fill_between_keyframes_copies_keys_and_blends():
    n, keys = 10, [0, 3, 6, 9]
    key_frames = torch.rand(len(keys), 3, 16, 16)
    pose = torch.rand(n, 3, 16, 16)
    out = fill_between_keyframes(LinearBlend(), key_frames, keys, pose)
    assert out.shape == (n, 3, 16, 16)
    torch.testing.assert_close(out[keys], key_frames)
    torch.testing.assert_close(out[4], key_frames[1] * 2 / 3 + key_frames[2] / 3)


# ---------------------------------------------------------------------------------------------------------------------
# the pipeline
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec,interp", [("fixed:3", "blend"), ("adaptive:0.02", "net")])
def test_pipeline_with_keyframes_returns_exactly_n_frames(tiny_model, spec, interp):
    from infer.pipeline import GenerationConfig, Pose2VideoPipeline
    from portrait.data.pose import draw_pose_sequence

    n = 7  # not divisible by 3
    lmk = _face_landmarks(n, 3 * np.sin(np.arange(n) / 1.2)).astype(np.float32)
    pose = draw_pose_sequence(lmk, 64)
    ref = np.full((64, 64, 3), 128, np.uint8)
    interpolator = "blend" if interp == "blend" else _randomise(build_interpolator("tiny"))
    pipe = Pose2VideoPipeline(tiny_model, interpolator=interpolator)
    out = pipe(ref, pose, GenerationConfig(steps=1, keyframes=spec), torch.Generator().manual_seed(0), landmarks=lmk)
    assert out.shape == (n, 3, 64, 64)
    keys = pipe.last_keyframes
    assert keys[0] == 0 and keys[-1] == n - 1 and len(keys) < n
    assert pipe.counters["interpolated_frames"] == n - len(keys)
    if spec == "fixed:3":
        assert keys == [0, 3, 6]
        # the keyframes are exactly the diffusion of the keyframe poses with the full-rate noise columns
        latents = torch.randn((1, 4, n, 16, 16), generator=torch.Generator().manual_seed(0))
        direct = Pose2VideoPipeline(tiny_model)(ref, pose[keys], GenerationConfig(steps=1), latents=latents[:, :, keys])
        torch.testing.assert_close(out[keys], direct, atol=1e-5, rtol=0)
        torch.testing.assert_close(out[1], out[0] * 2 / 3 + out[3] / 3)  # blend in between


def test_pipeline_keyframes_none_unchanged_and_errors(tiny_model):
    from infer.pipeline import GenerationConfig, Pose2VideoPipeline

    pose = np.zeros((3, 64, 64, 3), np.uint8)
    ref = np.full((64, 64, 3), 100, np.uint8)
    a = Pose2VideoPipeline(tiny_model)(ref, pose, GenerationConfig(steps=1), torch.Generator().manual_seed(1))
    b = Pose2VideoPipeline(tiny_model, interpolator="blend")(ref, pose, GenerationConfig(steps=1, keyframes="none"),
                                                            torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="needs an interpolator"):
        Pose2VideoPipeline(tiny_model)(ref, pose, GenerationConfig(steps=1, keyframes="fixed:2"))
    with pytest.raises(KeyframeSpecError, match="landmarks"):
        Pose2VideoPipeline(tiny_model, interpolator="blend")(ref, pose, GenerationConfig(steps=1, keyframes="adaptive:0.1"))
