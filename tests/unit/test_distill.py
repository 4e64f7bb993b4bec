"""Step/guidance distillation: solver maths, student construction, guided teacher, losses, student samplers."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch

from distill.export import sampler_metadata
from distill.models import AttachedView, build_student, conditioning, guided_prediction, student_prediction, update_target
from distill.objectives import ConsistencyDistillLoss, GuidanceDistillLoss
from distill.schedules import (
    SolverGrid,
    boundary_scalings,
    consistency_lcm,
    consistency_phased,
    ddim_jump,
    phase_boundaries,
    phase_end_index,
    predicted_x0_eps,
    student_timesteps,
)
from infer.pipeline import GenerationConfig, Pose2VideoPipeline
from infer.samplers import SAMPLERS, ddim, get_sampler, lcm, phased

REPO = Path(__file__).resolve().parents[2]


def _scheduler():
    from diffusers import DDIMScheduler

    from portrait.models.bundle import TEACHER_SCHEDULER

    return DDIMScheduler(**TEACHER_SCHEDULER)


def _inputs(frames=3, seed=0, batch=1):
    g = torch.Generator().manual_seed(seed)
    ref01 = torch.rand(batch, 3, 64, 64, generator=g)
    pose = torch.rand(batch, 3, frames, 64, 64, generator=g) * 2 - 1
    x = torch.randn(batch, 4, frames, 16, 16, generator=g)
    return ref01, pose, x


@pytest.fixture(scope="module")
def student_setup():
    """A 4-step LCM student built from a fresh tiny teacher (same weights as the ``tiny_model`` fixture)."""
    from tests.conftest import make_tiny_model

    student, nets = build_student(make_tiny_model(), 256, with_target=True, metadata=sampler_metadata("lcm", 4, 50))
    return student, nets


# ------------------------------------------------------------------------------------------------
# schedules
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [25, 50])
def test_solver_step_equals_teacher_ddim_step(n):
    """On the teacher's own trailing grid, the solver's step is DDIMScheduler.step (zero-SNR start and clean end included)."""
    sched = _scheduler()
    grid = SolverGrid.from_scheduler(sched, n)
    sched.set_timesteps(n)
    assert torch.equal(grid.timesteps, sched.timesteps)
    g = torch.Generator().manual_seed(1)
    x, v = torch.randn(2, 4, 2, 8, 8, generator=g), torch.randn(2, 4, 2, 8, 8, generator=g)
    for i in (0, 1, n // 2, n - 1):
        t = grid.timesteps[i]
        expected = sched.step(v, t, x, eta=0.0).prev_sample
        x0, eps = predicted_x0_eps(v, x, grid.alpha(torch.tensor([t, t])), grid.prediction_type)
        got = ddim_jump(x0, eps, grid.alpha(grid.timestep(torch.tensor([i + 1, i + 1]))))
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_zero_snr_boundary_conversions():
    grid = SolverGrid.from_scheduler(_scheduler(), 50)
    assert float(grid.alpha(torch.tensor(999))) == 0.0 and float(grid.alpha(torch.tensor(-1))) == 1.0
    g = torch.Generator().manual_seed(0)
    x, v = torch.randn(1, 4, 1, 4, 4, generator=g), torch.randn(1, 4, 1, 4, 4, generator=g)
    x0, eps = predicted_x0_eps(v, x, grid.alpha(torch.tensor([999])), "v_prediction")
    assert torch.equal(x0, -v) and torch.equal(eps, x)  # well defined at alpha_bar = 0
    with pytest.raises(ValueError, match="alpha_bar=0"):
        predicted_x0_eps(v, x, grid.alpha(torch.tensor([999])), "epsilon")
    with pytest.raises(ValueError, match="must divide"):
        SolverGrid.from_scheduler(_scheduler(), 48)


def test_student_grids_and_phase_edges():
    sched = _scheduler()
    grid = SolverGrid.from_scheduler(sched, 50)
    assert grid.skip == 20 and grid.timesteps[0] == 999 and grid.timesteps[-1] == 19
    assert student_timesteps(1, grid).tolist() == [999]
    assert student_timesteps(2, grid).tolist() == [999, 499]
    assert student_timesteps(4, grid).tolist() == [999, 759, 499, 259]
    for k in (1, 2, 5, 10, 25):  # N a multiple of k: the trailing k-grid itself
        sched.set_timesteps(k)
        assert student_timesteps(k, grid).tolist() == sched.timesteps.tolist()
    assert phase_boundaries(4, grid).tolist() == [0, 12, 25, 37, 50]
    assert phase_end_index(torch.tensor([0, 11, 12, 24, 25, 49]), 4, grid).tolist() == [12, 12, 25, 25, 37, 50]
    assert phase_end_index(torch.tensor([0, 49]), 1, grid).tolist() == [50, 50]
    assert grid.timestep(torch.tensor([0, 49, 50])).tolist() == [999, 19, -1]


def test_boundary_scalings_give_identity_at_t0():
    c_skip, c_out = boundary_scalings(torch.tensor([0, -1, 19, 999]))
    assert c_skip[0] == 1.0 and c_out[0] == 0.0 and c_skip[1] == 1.0 and c_out[1] == 0.0
    assert c_skip[2] < 1e-4 and c_out[2] > 0.9999 and c_skip[3] < 1e-6
    grid = SolverGrid.from_scheduler(_scheduler(), 50)
    g = torch.Generator().manual_seed(0)
    x, v = torch.randn(2, 4, 1, 4, 4, generator=g), torch.randn(2, 4, 1, 4, 4, generator=g)
    assert torch.equal(consistency_lcm(v, x, torch.tensor([0, 0]), grid), x)
    assert torch.equal(consistency_lcm(v, x, torch.tensor([-1, -1]), grid), x)
    t = torch.tensor([499, 259])
    torch.testing.assert_close(consistency_phased(v, x, t, t, grid), x, rtol=0, atol=1e-5)  # identity on the phase edge
    x0, _ = predicted_x0_eps(v, x, grid.alpha(t), "v_prediction")
    torch.testing.assert_close(consistency_phased(v, x, t, torch.tensor([-1, -1]), grid), x0)  # last phase: x0


# ------------------------------------------------------------------------------------------------
# student, teacher, target
# ------------------------------------------------------------------------------------------------


def test_student_at_init_equals_teacher_unguided(tiny_model, student_setup):
    student, nets = student_setup
    assert student.config.time_cond_proj_dim == 256
    assert float(student.denoising_unet.time_embedding.cond_proj.weight.detach().abs().max()) == 0.0
    ref01, pose, x = _inputs()
    t = torch.tensor([500])
    with torch.no_grad():
        c_teacher = conditioning(tiny_model, ref01, pose, guided=True)
        v_teacher = tiny_model.denoise(x, t, c_teacher.enc, c_teacher.feats, c_teacher.bank)
        c = conditioning(student, ref01, pose, guided=True)
        for w in (2.0, 3.5, 5.0):
            v_student = student_prediction(student, None, x, t, c, torch.tensor([w]))
            v_target = student_prediction(student, nets.target, x, t, c, torch.tensor([w]))
            assert torch.equal(v_student, v_teacher) and torch.equal(v_target, v_teacher)
        v_copy = student.denoise(x, t, c.enc, c.feats, c.bank, unet=nets.teacher)
    assert torch.equal(v_copy, v_teacher)


def test_teacher_and_target_sit_outside_the_trained_module(student_setup):
    student, nets = student_setup
    grid = SolverGrid.from_scheduler(student.make_scheduler(), 50)
    loss = ConsistencyDistillLoss(student, nets, grid)
    inside = {id(p) for p in loss.parameters()}
    assert not inside & {id(p) for p in nets.teacher.parameters()}
    assert not inside & {id(p) for p in nets.target.parameters()}
    assert all(not k.startswith("nets") for k in loss.state_dict())
    trainable = {id(p) for p in loss.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in student.denoising_unet.parameters()}  # full UNet incl. motion modules
    assert any(".motion_modules." in n for n, p in student.denoising_unet.named_parameters() if p.requires_grad)
    assert not any(p.requires_grad for p in nets.teacher.parameters())


@pytest.mark.parametrize("uncond", ["zero_embed", "self"])
def test_guided_teacher_prediction_equals_pipeline_cfg(tiny_model, uncond):
    old = tiny_model.config.uncond_reference
    tiny_model.config.uncond_reference = uncond
    try:
        ref01, pose, x = _inputs(frames=4)
        pipe = Pose2VideoPipeline(tiny_model)
        pose_frames = ((pose[0] + 1) / 2).permute(1, 0, 2, 3)  # (F, 3, H, W) in [0, 1]
        prep = pipe.prepare(ref01[0], pose_frames, guided=True)
        t = torch.tensor(759)
        with torch.no_grad():
            expected = pipe.model_fn(prep, GenerationConfig(guidance=3.5))(x, t)
            cond = conditioning(tiny_model, ref01, prep.pose, guided=True)
            got = guided_prediction(tiny_model, None, x, t, cond, torch.tensor([3.5]))
    finally:
        tiny_model.config.uncond_reference = old
    assert (cond.bank_uncond is None) == (uncond == "self")
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_update_target_is_a_fixed_decay_ema():
    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    before = a.weight.detach().clone()
    update_target(a, b, 0.95)
    torch.testing.assert_close(a.weight, 0.95 * before + 0.05 * b.weight.detach())


def _batch(n, frames=2, seed=0):
    g = torch.Generator().manual_seed(seed)

    def u8(*shape):
        return torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)

    return {"target": u8(n, frames, 3, 64, 64), "pose": u8(n, frames, 3, 64, 64), "ref_frame": u8(n, 3, 64, 64)}


@pytest.mark.parametrize("mode", ["lcm", "phased", "guidance"])
def test_loss_is_per_sample_so_batch_splits_agree(student_setup, mode):
    """Loss of a batch of 2 == mean of the two 1-sample losses (what makes 2 processes x b equal 1 process x 2b)."""
    student, nets = student_setup
    grid = SolverGrid.from_scheduler(student.make_scheduler(), 50)
    loss_fn = GuidanceDistillLoss(student, nets, grid) if mode == "guidance" else ConsistencyDistillLoss(student, nets, grid, mode, num_phases=2)
    batch = _batch(2)

    def gens(ids):
        from portrait.training import sample_generator

        return [sample_generator(0, i, "distill") for i in ids]

    both, logs = loss_fn(batch, gens([0, 1]))
    halves = [loss_fn({k: v[i : i + 1] for k, v in batch.items()}, gens([i]))[0] for i in range(2)]
    torch.testing.assert_close(both, (halves[0] + halves[1]) / 2, rtol=1e-5, atol=1e-7)
    assert torch.isfinite(both) and 2.0 <= float(logs["w"]) <= 5.0
    student.denoising_unet.zero_grad(set_to_none=True)
    both.backward()
    grads = [p.grad for p in student.denoising_unet.parameters()]
    assert all(g is not None for g in grads) and any(float(g.abs().max()) > 0 for g in grads)
    assert all(p.grad is None for p in nets.teacher.parameters()) and all(p.grad is None for p in student.reference_unet.parameters())
    student.denoising_unet.zero_grad(set_to_none=True)


# ------------------------------------------------------------------------------------------------
# samplers
# ------------------------------------------------------------------------------------------------


def _toy_model_fn(x, t):
    return torch.tanh(x) * (0.5 + float(t) / 1000.0)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_every_sampler_respects_the_one_signature(name):
    common = list(inspect.signature(ddim).parameters)
    params = inspect.signature(SAMPLERS[name]).parameters
    assert list(params)[: len(common)] == common
    assert all(p.default is not inspect.Parameter.empty for n, p in params.items() if n not in ("model_fn", "latents", "scheduler", "steps"))
    x = torch.randn(1, 4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    seen = []
    out = get_sampler(name)(_toy_model_fn, x, _scheduler(), 3, generator=torch.Generator().manual_seed(1),
                            progress=lambda ts: seen.append(len(ts)) or ts)
    assert out.shape == x.shape and out.dtype == x.dtype and torch.isfinite(out).all()
    assert seen == [3]


def test_phased_sampler_on_the_teacher_grid_equals_ddim():
    x = torch.randn(1, 4, 2, 8, 8, generator=torch.Generator().manual_seed(0))
    for k in (1, 2, 4, 25):
        a = ddim(_toy_model_fn, x, _scheduler(), k)
        b = phased(_toy_model_fn, x, _scheduler(), k, solver_steps=k)
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6)


def test_lcm_sampler_renoises_with_the_generator():
    x = torch.randn(1, 4, 2, 8, 8, generator=torch.Generator().manual_seed(0))
    grid = SolverGrid.from_scheduler(_scheduler(), 50)
    one = lcm(_toy_model_fn, x, _scheduler(), 1)
    torch.testing.assert_close(one, consistency_lcm(_toy_model_fn(x, 999), x, torch.tensor(999), grid))
    a = lcm(_toy_model_fn, x, _scheduler(), 4, generator=torch.Generator().manual_seed(3))
    b = lcm(_toy_model_fn, x, _scheduler(), 4, generator=torch.Generator().manual_seed(3))
    c = lcm(_toy_model_fn, x, _scheduler(), 4, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and (a - c).abs().max() > 1e-3


def test_get_sampler_binds_only_the_options_a_sampler_takes():
    assert get_sampler("ddim", solver_steps=40) is ddim
    fn = get_sampler("lcm", solver_steps=40, bogus=1)
    assert fn.keywords == {"solver_steps": 40}
    with pytest.raises(ValueError, match="unknown sampler"):
        get_sampler("euler")


@pytest.mark.parametrize("sampler", ["lcm", "phased", "ddim"])
def test_student_through_the_pipeline(student_setup, sampler):
    student, nets = student_setup
    old = dict(student.metadata)
    student.metadata.update(sampler=sampler)
    try:
        ref01, pose, _ = _inputs(frames=5)
        pipe = Pose2VideoPipeline(student)
        out = pipe(ref01[0], ((pose[0] + 1) / 2).permute(1, 0, 2, 3), GenerationConfig(steps=2, guidance=3.5), torch.Generator().manual_seed(0))
        assert pipe.sampler_name(GenerationConfig()) == sampler  # the folder's sampler is the default
        assert pipe.sampler_name(GenerationConfig(sampler="ddim")) == "ddim"  # the user's choice wins
    finally:
        student.metadata = old
    assert out.shape == (5, 3, 64, 64) and 0 <= float(out.min()) and float(out.max()) <= 1
    assert pipe.counters["unet_evals"] == 2  # guidance folded in: one evaluation per step


def test_teacher_view_samples_the_teacher_with_cfg(tiny_model, student_setup):
    student, nets = student_setup
    ref01, pose, _ = _inputs(frames=3)
    pose_frames = ((pose[0] + 1) / 2).permute(1, 0, 2, 3)
    gen = GenerationConfig(steps=2, guidance=3.5)
    view_pipe = Pose2VideoPipeline(AttachedView(student, nets.teacher, tiny_model.config))
    a = view_pipe(ref01[0], pose_frames, gen, torch.Generator().manual_seed(0))
    b = Pose2VideoPipeline(tiny_model)(ref01[0], pose_frames, gen, torch.Generator().manual_seed(0))
    assert view_pipe.counters["unet_evals"] == 4  # CFG: two halves per step
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# configs
# ------------------------------------------------------------------------------------------------


def test_distill_configs_validate_and_the_tiny_4step_one_is_the_embedded_default():
    from portrait import config as config_lib
    from train.distill import DistillConfig, validate

    files = sorted((REPO / "configs" / "distill").glob("*.yaml"))
    assert {f.stem for f in files} >= {"tiny_1step", "tiny_2step", "tiny_4step", "tiny_guidance", "aniportrait_4step"}
    for f in files:
        validate(config_lib.load(DistillConfig, f))
    assert config_lib.load(DistillConfig, REPO / "configs/distill/tiny_4step.yaml") == DistillConfig()
    with pytest.raises(config_lib.ConfigError, match="must divide 1000"):
        validate(config_lib.load(DistillConfig, None, ["solver_steps=48"]))
    with pytest.raises(config_lib.ConfigError, match="mode"):
        validate(config_lib.load(DistillConfig, None, ["mode=adversarial"]))
