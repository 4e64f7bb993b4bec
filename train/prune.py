"""Prune the denoising UNet of a model folder (teacher or distilled student) and recover it with knowledge distillation.

    bash launch.sh prune                                                     # the embedded default (tiny teacher, 40 % MACs)
    accelerate launch train/prune.py --config configs/prune/tiny.yaml
    accelerate launch train/prune.py --config configs/prune/tiny_4step.yaml  # prune the 4-step student, KD vs unpruned student
    accelerate launch train/prune.py --config configs/prune/tiny.yaml kd=false train.run_dir=runs/prune/tiny_nokd export_dir=runs/prune/tiny_nokd/model
    accelerate launch train/prune.py --config configs/prune/tiny.yaml rounds=3       # iterative: prune 1/3, KD, 2/3, KD, 3/3, KD
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 train/prune.py   # 2-process gloo DDP

Each round ``k`` of ``rounds`` (``RUN/round-k/``):

1. prune the previous round's model (the source for round 1) to ``k/rounds`` of the final ratio (or of
   ``target_mac_reduction``) with ``importance`` (magnitude, or Taylor from ``taylor_clips`` clips of the model's own
   objective at its own inference timesteps), and save it as ``RUN/round-k/pruned`` (a model folder with a width
   manifest) -- so a resumed round reloads exactly the same architecture;
2. recover with KD (``prune.kd.PruneKDLoss``: task + output KD + LAPTOP-Diff-normalised feature KD against the frozen
   *unpruned source* UNet, which sits outside accelerate's engine) for this round's share of ``train.max_steps``;
3. export ``RUN/round-k/model`` (EMA weights) and write ``DONE``.

The last round's export is copied to ``export_dir`` with a model card recording ratio, MACs, parameters, wall time and
(``eval_clips`` > 0) a quick held-out evaluation. Re-running the same command skips finished rounds and resumes an
unfinished one from its last complete checkpoint. ``kd=false`` trains with the task loss only (the KD-vs-no-KD row).
"""

from __future__ import annotations

import sys

if not __package__:  # launched by path: put the repo root first so `prune`, `portrait` resolve (DESIGN §2)
    from pathlib import Path as _P

    sys.path[0] = str(_P(__file__).resolve().parents[1])

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from portrait import config as config_lib
from portrait import training as T
from portrait.data.dataset import ClipDataset
from portrait.models.bundle import ModelFolderError, Pose2VideoModel
from portrait.models.widths import load_unet
from portrait.objectives import TeacherDiffusionLoss
from prune import graph as G
from prune import pruner
from prune.export import pruned_model_card
from prune.kd import PruneKDLoss


@dataclass
class PruneConfig:
    model: str = "portrait/assets/tiny_teacher"  # the unpruned model folder (teacher, or a distilled student)
    export_dir: str = "runs/prune/tiny/model"
    importance: str = "taylor"  # magnitude | taylor
    scope: str = "local"  # local: every structure shrinks by the ratio; global: rank across structures of a kind
    ratio: float = 0.5  # final fraction of units removed (heads, GroupNorm groups, GEGLU channels)
    target_mac_reduction: float = 0.4  # > 0: find the global ratio by bisection to remove this fraction of UNet MACs
    # (then ``ratio`` is ignored; set 0 to prune by ``ratio``)
    block_ratios: dict[str, float] = field(default_factory=dict)  # e.g. {mid_block: 0.7, down_blocks.0: 0.2}
    kind_ratios: dict[str, float] = field(default_factory=dict)  # e.g. {motion_attention: 0.5}
    kinds: list[str] = field(default_factory=lambda: list(G.KINDS))
    rounds: int = 1  # iterative pruning: k/rounds of the final ratio per round, KD after each
    taylor_clips: int = 16  # clips whose task-loss gradients give the Taylor importance
    taylor_steps: int = 0  # inference steps whose timesteps the Taylor loss uses (0: the model's default)
    kd: bool = True  # false: task loss only (the no-KD ablation)
    task_weight: float = 1.0
    out_kd_weight: float = 1.0
    feat_kd_weight: float = 1.0
    snr_gamma: float = 5.0  # teacher task loss (portrait.objectives.TeacherDiffusionLoss)
    # the teacher's loss-weight floor: 1.0 (plain v-MSE) as the shipped tiny teacher v2 was trained; 0.0 for
    # AniPortrait's min-SNR weight (an imported AniPortrait model, tiny teacher v1)
    min_weight: float = 1.0
    noise_offset: float = 0.05
    uncond_ratio: float = 0.1
    num_frames: int = 8  # frames per training clip
    count_frames: int = 16  # frames per UNet evaluation for the MAC / wall-time count in the card
    count_repeats: int = 5
    eval_clips: int = 4  # quick held-out evaluation of the export for its card (0: skip)
    eval_frames: int = 8
    data: T.DataConfig = field(default_factory=lambda: T.DataConfig(reference="mixed"))  # as the teacher trained
    train: T.TrainConfig = field(default_factory=lambda: T.TrainConfig(
        run_dir="runs/prune/tiny", batch_size=2, max_steps=150, lr=5e-5, lr_warmup_steps=10, ema_decay=0.99,
        checkpoint_every=50, log_every=10))


def spec_of(cfg: PruneConfig, fraction: float) -> pruner.PruneSpec:
    scale = lambda d: {k: v * fraction for k, v in d.items()}  # noqa: E731
    spec = pruner.PruneSpec(cfg.ratio * fraction, scale(dict(cfg.block_ratios)), scale(dict(cfg.kind_ratios)), list(cfg.kinds),
                            cfg.scope, cfg.importance)
    spec.validate()
    return spec


def validate(cfg: PruneConfig) -> None:
    try:
        spec_of(cfg, 1.0)
    except ValueError as e:
        raise config_lib.ConfigError(str(e)) from None
    if cfg.rounds < 1:
        raise config_lib.ConfigError(f"rounds must be >= 1, got {cfg.rounds}")
    if not 0.0 <= cfg.target_mac_reduction < 1.0:
        raise config_lib.ConfigError(f"target_mac_reduction must be in [0, 1), got {cfg.target_mac_reduction}")
    if cfg.train.max_steps < cfg.rounds:
        raise config_lib.ConfigError(f"train.max_steps ({cfg.train.max_steps}) must give every one of the {cfg.rounds} rounds a step")
    if not cfg.kd and cfg.task_weight <= 0:
        raise config_lib.ConfigError("kd=false needs task_weight > 0 (nothing would be trained)")
    if not (Path(cfg.model) / "fastportrait.json").is_file():
        raise ModelFolderError(f"model folder {cfg.model} not found: train a teacher (`bash launch.sh teacher`) or set model=PATH")


def taylor_batches(cfg: PruneConfig, dataset: ClipDataset) -> list:
    """``taylor_clips`` fixed training clips, one per batch, each with its own generator (deterministic)."""
    n = min(cfg.taylor_clips, len(dataset))
    plan = T.GlobalBatchPlan(len(dataset), 1, 1, cfg.train.seed + 7919)
    out = []
    for i in range(n):
        batch = T.load_items(dataset, plan.items(i, 0, 0, 1))
        out.append((batch, [T.sample_generator(cfg.train.seed, int(batch["sample_id"][0]), "taylor")]))
    return out


def prune_round(cfg: PruneConfig, k: int, init: Path, dataset: ClipDataset, accelerator) -> tuple[Pose2VideoModel, dict]:
    """Round k's pruned (not yet recovered) model: reloaded from RUN/round-k/pruned, or pruned now and saved there."""
    pruned_dir = Path(cfg.train.run_dir) / f"round-{k}" / "pruned"
    if not (pruned_dir / "fastportrait.json").is_file():
        if accelerator.is_main_process:
            model = Pose2VideoModel.from_pretrained(init, device=accelerator.device)
            fraction = k / cfg.rounds
            steps = cfg.taylor_steps or None
            batches = taylor_batches(cfg, dataset) if cfg.importance == "taylor" else None
            timesteps = pruner.inference_timesteps(model, steps) if batches else None
            ref_macs = None
            if cfg.target_mac_reduction and k > 1:  # the target of round k is k/K of the cut *from the unpruned source*
                source = Pose2VideoModel.from_pretrained(cfg.model, device=accelerator.device)
                ref_macs = pruner.unet_macs(source, G.example_inputs(source, frames=2))
                del source
            report = pruner.prune_model(model, spec_of(cfg, fraction), batches=batches, timesteps=timesteps,
                                        target_mac_reduction=cfg.target_mac_reduction * fraction or None, count_frames=2,
                                        reference_macs=ref_macs)
            if ref_macs:
                report["mac_reduction_from_source"] = 1 - report["macs_after"] / ref_macs
            report.update(round=k, rounds=cfg.rounds)
            T.logger.info(f"[round {k}] pruned ratio {report['ratio']:.3f}: MACs -{report['mac_reduction']:.1%}, "
                          f"params -{report['param_reduction']:.1%} ({report['units_removed']} units)")
            model.save_pretrained(pruned_dir, metadata={"pruning_round": report})
        accelerator.wait_for_everyone()
    model = Pose2VideoModel.from_pretrained(pruned_dir, device=accelerator.device)  # every process: the same widths
    return model, dict(model.metadata.get("pruning_round", {}))


def run_round(cfg: PruneConfig, k: int, init: Path, accelerator) -> Path:
    """Prune + KD-recover one round; return its exported model folder."""
    # 1. setup ------------------------------------------------------------------------------------
    round_dir = Path(cfg.train.run_dir) / f"round-{k}"
    export, done = round_dir / "model", round_dir / "DONE"
    steps = cfg.train.max_steps * k // cfg.rounds - cfg.train.max_steps * (k - 1) // cfg.rounds
    if done.is_file() and (export / "fastportrait.json").is_file() and int(done.read_text() or 0) >= steps:
        T.logger.info(f"[round {k}] already finished: reusing {export}")
        return export
    train = dataclasses.replace(cfg.train, max_steps=steps, run_dir=str(round_dir))
    micro = T.per_process_batch(train, accelerator.num_processes)
    manager = T.CheckpointManager(round_dir, train.keep_checkpoints)
    data_path = T.ensure_dataset(cfg.data, accelerator)
    dataset = ClipDataset(T.train_split(cfg.data, data_path), "train", num_frames=cfg.num_frames, strides=cfg.data.strides, reference=cfg.data.reference, seed=cfg.data.seed)
    # 2. models: the pruned bundle (trained) and the frozen unpruned source UNet (outside the engine) ---------------
    model, report = prune_round(cfg, k, init, dataset, accelerator)
    if dataset.height != model.config.resolution:
        raise config_lib.ConfigError(f"dataset {data_path} is {dataset.height}px but the model generates {model.config.resolution}px")
    frozen = model.attach_unet(load_unet(Path(cfg.model) / "denoising_unet").to(accelerator.device)).requires_grad_(False).eval()
    model.requires_grad_(False)
    model.denoising_unet.requires_grad_(True)
    model.train()
    student = model.config.time_cond_proj_dim is not None
    task = None if student else TeacherDiffusionLoss(model, cfg.snr_gamma, cfg.noise_offset, cfg.uncond_ratio, cfg.min_weight)
    dist = model.metadata.get("distillation", {})
    objective = PruneKDLoss(model, frozen, task, pruner.inference_timesteps(model, cfg.taylor_steps or None) if student else None,
                            cfg.task_weight, cfg.out_kd_weight if cfg.kd else 0.0, cfg.feat_kd_weight if cfg.kd else 0.0,
                            tuple(dist.get("guidance_range", (2.0, 5.0))))
    params = [p for p in model.denoising_unet.parameters() if p.requires_grad]
    plan = T.GlobalBatchPlan(len(dataset), train.batch_size, micro, train.seed + 1000 * k)
    probe = T.load_items(dataset, plan.items(0, 0, 0, 1)[:1])
    params = T.drop_unused_parameters(params, lambda: objective(probe, [T.sample_generator(train.seed, -1, "probe")])[0])
    T.logger.info(f"[round {k}] KD recovery ({'task + out-KD + feature-KD' if cfg.kd else 'task only'}) of "
                  f"{sum(p.numel() for p in params) / 1e6:.3f} M parameters for {steps} steps; global batch {train.batch_size}")
    # 3. optimiser / EMA ---------------------------------------------------------------------------
    objective, optimizer, sched, ema, state = T.prepare_optimisation(accelerator, objective, params, train)
    # 4. resume -----------------------------------------------------------------------------------
    T.resume(accelerator, manager, state)
    # 5. loop -------------------------------------------------------------------------------------
    T.run_loop(accelerator, train, state, manager, tag=f"prune/round-{k}", desc=f"prune round {k}", run_dir=round_dir,
               plan=plan, dataset=dataset, stream=f"prune-{k}", accumulate=objective, params=params, optimizer=optimizer,
               scheduler=sched, ema=ema, compute_loss=objective, checkpoint_extra={"round": k})
    # 6. export (EMA weights) ----------------------------------------------------------------------
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        ema.store(params)
        ema.copy_to(params)
        model.eval()
        meta = {"pruning_round": report, "train_steps": state.step, "samples_seen": state.samples_seen,
                "train_minutes": round(state.wall_seconds / 60, 2)}
        model.save_pretrained(export, metadata=meta)
        ema.restore(params)
        done.write_text(str(state.step))
    accelerator.wait_for_everyone()
    accelerator.free_memory()
    accelerator._custom_objects.clear()
    return export


def finalize(cfg: PruneConfig, last: Path, rounds: list[dict]) -> Path:
    """Count the final model against its source, evaluate it, write the card, and publish it to ``export_dir``."""
    from prune.count import unet_cost

    source = Pose2VideoModel.from_pretrained(cfg.model)
    model = Pose2VideoModel.from_pretrained(last)
    before = unet_cost(source, cfg.count_frames, cfg.count_repeats)
    after = unet_cost(model, cfg.count_frames, cfg.count_repeats)
    del source
    final = rounds[-1]
    recovery = (f"{'task + output KD + LAPTOP-Diff feature KD' if cfg.kd else 'task loss only (no KD)'}; "
                f"task = {'x0 regression at the student timesteps (distillation objective needs the original teacher)' if model.config.time_cond_proj_dim is not None else 'TeacherDiffusionLoss'}; "
                f"weights task/out/feat = {cfg.task_weight}/{cfg.out_kd_weight if cfg.kd else 0}/{cfg.feat_kd_weight if cfg.kd else 0}; "
                f"{cfg.train.max_steps} steps x batch {cfg.train.batch_size} x {cfg.num_frames} frames")
    pruning = {"source": str(cfg.model), "importance": cfg.importance, "scope": cfg.scope, "ratio": final.get("ratio"),
               "target_mac_reduction": cfg.target_mac_reduction or None, "block_ratios": dict(cfg.block_ratios),
               "kind_ratios": dict(cfg.kind_ratios), "kinds": list(cfg.kinds), "rounds": cfg.rounds, "kd": cfg.kd,
               "recovery": recovery, "taylor_clips": final.get("taylor_clips"), "round_reports": rounds,
               "cost": {"frames": cfg.count_frames, "threads": torch.get_num_threads(),
                        "macs_before": before["macs"], "macs_after": after["macs"], "mac_reduction": 1 - after["macs"] / before["macs"],
                        "params_before": before["params"], "params_after": after["params"],
                        "param_reduction": 1 - after["params"] / before["params"],
                        "seconds_before": before["seconds"], "seconds_after": after["seconds"]}}
    metrics = {}
    if cfg.eval_clips > 0:
        from infer.evaluate import evaluate
        from infer.pipeline import GenerationConfig

        gen = GenerationConfig(steps=int(model.metadata.get("default_steps", 25)), guidance=float(model.metadata.get("default_guidance", 3.5)))
        res = evaluate(str(last), cfg.data.path, [("pruned", gen)], "test", cfg.eval_clips, cfg.eval_frames, baselines=False)
        metrics = {"pruned": res["rows"]["pruned"], "_protocol": f"self-reenactment, {res['clips']} test clips x {cfg.eval_frames} frames"}
    meta = dict(model.metadata)
    meta.pop("pruning_round", None)
    meta.update({"title": f"pruned ({pruning['cost']['mac_reduction']:.0%} fewer UNet MACs) {model.metadata.get('title', cfg.model)}",
                 "pruning": pruning, "metrics": metrics, "config": config_lib.to_dict(cfg)})
    model.metadata = meta
    out = Path(cfg.export_dir)
    model.save_pretrained(out, model_card=pruned_model_card(model, meta))  # atomic (temp folder + rename)
    print(f"pruned model exported to {out}: MACs -{pruning['cost']['mac_reduction']:.1%}, params -{pruning['cost']['param_reduction']:.1%}")
    return out


def main(cfg: PruneConfig) -> Path:
    validate(cfg)
    run_dir = Path(cfg.train.run_dir)
    accelerator = T.make_accelerator(cfg.train, run_dir)
    done = run_dir / "DONE"
    if done.is_file() and (Path(cfg.export_dir) / "fastportrait.json").is_file() and int(done.read_text() or 0) >= cfg.train.max_steps:
        T.logger.info(f"already finished ({done.read_text()} steps): {cfg.export_dir}")
        return Path(cfg.export_dir)
    T.write_run_config(run_dir, cfg, accelerator)
    T.init_tracker(accelerator, cfg.train, f"prune-{cfg.importance}-{cfg.ratio}", cfg)
    init = Path(cfg.model)
    try:
        for k in range(1, cfg.rounds + 1):
            init = run_round(cfg, k, init, accelerator)
        if accelerator.is_main_process:
            reports = [json.loads((Path(cfg.train.run_dir) / f"round-{k}" / "model" / "fastportrait.json").read_text())["metadata"].get("pruning_round", {})
                       for k in range(1, cfg.rounds + 1)]
            finalize(cfg, init, reports)
            done.write_text(str(cfg.train.max_steps))
        accelerator.wait_for_everyone()
    finally:
        accelerator.end_training()
    return Path(cfg.export_dir)


if __name__ == "__main__":
    raise SystemExit(config_lib.run_script(PruneConfig, main, "Prune the denoising UNet and recover it with KD (tiny CPU default).",
                                           (T.NonFiniteLossError, OSError, ModelFolderError, G.PruneGraphError)))
