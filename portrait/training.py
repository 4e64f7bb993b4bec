"""The loop helpers every ``train/`` script shares: accelerator setup, batch arithmetic, deterministic data
and noise, EMA, resumable atomic checkpoints, NaN guards, tracking and export.

Design (DESIGN §3.4-3.5):

* **Stateless data order.** The global batch of step ``s`` is a pure function of ``(seed, s)``: a per-epoch
  permutation of the dataset, sliced by samples seen. Rank ``r`` takes its slice of the global batch. So a
  resumed run sees exactly the data it would have seen, and 2 processes x batch b see the same samples as
  1 process x batch 2b.
* **Per-sample randomness.** Noise, timesteps and dropout of global sample ``j`` come from a generator seeded
  with ``(seed, j)``, not from a per-rank stream, for the same reason.
* **Resume state is not a release.** ``checkpoints/step-0001200/`` holds accelerate's state (model, optimiser,
  LR scheduler, RNG, EMA, train state); it is written to a ``.tmp`` folder, completed with a ``COMPLETE``
  marker and renamed, so a kill at any moment never leaves a checkpoint that resume would pick up. The last
  ``keep_checkpoints`` are kept. Exports are model folders (``Pose2VideoModel.save_pretrained``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration

from portrait import config as config_lib

logger = logging.getLogger("fastportrait")

CHECKPOINT_RE = re.compile(r"^step-(\d{7})$")
COMPLETE_MARKER = "COMPLETE"


@dataclass
class DataConfig:
    """Where clips come from. The embedded default generates synthetic portraits if ``path`` is missing."""

    path: str = "runs/data/synthetic64"
    generate_clips: int = 2000  # clips to generate when ``path`` does not exist (0: error instead)
    size: int = 64
    clip_frames: int = 16
    seed: int = 0
    strides: list[int] = field(default_factory=lambda: [1, 2])
    reference: str = "random"
    num_workers: int = 0
    # More dataset folders whose *train* split is appended to the training set (e.g. synthetic clips of another seed,
    # or ingested real videos). Validation and evaluation always use ``path``'s splits; see ``train_split``.
    extra_train: list[str] = field(default_factory=list)


@dataclass
class TrainConfig:
    """Optimisation and bookkeeping shared by every training job."""

    run_dir: str = "runs/teacher/tiny"
    seed: int = 0
    batch_size: int = 8  # global batch (all processes x accumulation), counted in samples
    grad_accum_steps: int = 1
    max_steps: int = 1000
    lr: float = 1e-4
    lr_schedule: str = "constant_with_warmup"
    lr_warmup_steps: int = 50
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    mixed_precision: str = "no"  # no | bf16 | fp16
    ema_decay: float = 0.999
    checkpoint_every: int = 250
    keep_checkpoints: int = 2
    log_every: int = 10
    sample_every: int = 0  # 0: only at the end
    tracker: str = "wandb"  # wandb (offline unless logged in) | none
    wandb_project: str = "fastportrait"
    threads: int = 0  # torch CPU threads per process (0: leave the default)


class NonFiniteLossError(RuntimeError):
    """Raised when a loss turns NaN/inf; the run stops and the last good checkpoint is kept."""


def stable_seed(*parts: object) -> int:
    """A 63-bit seed from any parts, identical in every process and Python run."""
    h = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


def sample_generator(seed: int, sample_id: int, purpose: str = "") -> torch.Generator:
    return torch.Generator().manual_seed(stable_seed(seed, sample_id, purpose))


# ------------------------------------------------------------------------------------------------
# Accelerator and batch arithmetic
# ------------------------------------------------------------------------------------------------


def make_accelerator(train: TrainConfig, run_dir: Path) -> Accelerator:
    """Accelerator with a project dir, optional W&B tracker, and gloo for multi-process CPU runs."""
    # Denormal floats (tiny softmax/activation values once training has progressed) make x86 CPU arithmetic 10-100x
    # slower: a tiny-teacher stage-1 step went from ~0.7 s to ~40 s around step 850. Flush them to zero. The flag is
    # per thread (MXCSR) and worker threads inherit it when created, so set it before anything starts the pool.
    torch.set_flush_denormal(True)
    if train.threads:
        torch.set_num_threads(train.threads)
    handlers = []
    if not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        handlers.append(InitProcessGroupKwargs(backend="gloo"))
    log_with = None
    if train.tracker == "wandb":
        os.environ.setdefault("WANDB_MODE", "offline")  # no key, no network needed; `wandb sync` later
        os.environ.setdefault("WANDB_DIR", str(run_dir))
        log_with = "wandb"
    elif train.tracker != "none":
        raise config_lib.ConfigError(f"train.tracker must be 'wandb' or 'none', got {train.tracker!r}")
    acc = Accelerator(
        gradient_accumulation_steps=train.grad_accum_steps,
        mixed_precision=train.mixed_precision,
        log_with=log_with,
        project_config=ProjectConfiguration(project_dir=str(run_dir), automatic_checkpoint_naming=False),
        kwargs_handlers=handlers,
        step_scheduler_with_optimizer=False,  # the loop steps the schedule once per optimiser step, on every world size
    )
    logging.basicConfig(level=logging.INFO if acc.is_main_process else logging.ERROR, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("accelerate", "accelerate.accelerator", "accelerate.checkpointing", "DeepSpeed", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return acc


def per_process_batch(train: TrainConfig, world_size: int) -> int:
    """Micro-batch per process; the global batch must split evenly (checked up front)."""
    denom = world_size * train.grad_accum_steps
    if train.batch_size % denom:
        raise config_lib.ConfigError(
            f"train.batch_size={train.batch_size} is not divisible by processes ({world_size}) x "
            f"grad_accum_steps ({train.grad_accum_steps}); choose a multiple of {denom}")
    return train.batch_size // denom


def deepspeed_plugin(accelerator: Accelerator):
    """The accelerate DeepSpeed plugin of this run, or None (DDP / single process)."""
    return getattr(accelerator.state, "deepspeed_plugin", None)


def configure_deepspeed(accelerator: Accelerator, train: TrainConfig, micro: int) -> int | None:
    """Fill the DeepSpeed json's ``"auto"`` batch/accumulation/clipping values from the training config.

    Our loop feeds batches itself (no DataLoader goes through ``prepare``), so accelerate cannot infer the
    micro-batch; and the json must agree with ``train.*`` or the global batch (DESIGN §3.5) would silently
    change. Explicit json values that disagree are a ConfigError. Returns the ZeRO stage, or None without
    DeepSpeed. Call before ``accelerator.prepare``.
    """
    plugin = deepspeed_plugin(accelerator)
    if plugin is None:
        return None
    ds = plugin.deepspeed_config
    want = {"train_micro_batch_size_per_gpu": micro, "train_batch_size": train.batch_size,
            "gradient_accumulation_steps": train.grad_accum_steps, "gradient_clipping": float(train.max_grad_norm)}
    for key, value in want.items():
        have = ds.get(key, "auto")
        if have == "auto":
            ds[key] = value
        elif float(have) != float(value):
            raise config_lib.ConfigError(
                f"the DeepSpeed config sets {key}={have} but the training config implies {value} "
                f"(train.batch_size / grad_accum_steps / max_grad_norm): set it to \"auto\" in the json")
    return int(plugin.zero_stage)


class GlobalBatchPlan:
    """Which dataset items and sample ids each process uses at each (step, micro-step)."""

    def __init__(self, num_items: int, global_batch: int, micro_batch: int, seed: int):
        if num_items <= 0:
            raise ValueError("the training split is empty")
        self.n, self.global_batch, self.micro, self.seed = num_items, global_batch, micro_batch, seed
        self._perm_cache: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perm_cache:
            self._perm_cache = {epoch: torch.randperm(self.n, generator=torch.Generator().manual_seed(stable_seed(self.seed, "epoch", epoch)))}
        return self._perm_cache[epoch]

    def items(self, step: int, micro_step: int, rank: int, world: int) -> list[tuple[int, int, int]]:
        """-> [(epoch, dataset index, global sample id)] for this process's micro-batch."""
        start = step * self.global_batch + (micro_step * world + rank) * self.micro
        out = []
        for j in range(start, start + self.micro):
            epoch, pos = divmod(j, self.n)
            out.append((epoch, int(self._perm(epoch)[pos]), j))
        return out


def micro_batch(plan: GlobalBatchPlan, dataset, accelerator: Accelerator, step: int, micro_step: int, seed: int,
                purpose: str) -> tuple[dict[str, torch.Tensor], list[torch.Generator]]:
    """This process's micro-batch of ``step`` and one generator per sample (the data/noise contract, in one place)."""
    batch = load_items(dataset, plan.items(step, micro_step, accelerator.process_index, accelerator.num_processes))
    gens = [sample_generator(seed, sid, purpose) for sid in batch["sample_id"].tolist()]
    return batch, gens


def load_items(dataset, items: list[tuple[int, int, int]]) -> dict[str, torch.Tensor]:
    """Fetch and collate ``items`` from a ``ClipDataset`` (its randomness is keyed by (seed, epoch, index))."""
    from portrait.data.dataset import collate_clips

    samples = []
    for epoch, idx, sample_id in items:
        dataset.set_epoch(epoch)
        s = dataset[idx]
        s["sample_id"] = torch.tensor(sample_id, dtype=torch.int64)
        samples.append(s)
    return collate_clips(samples)


# ------------------------------------------------------------------------------------------------
# Train state, EMA, checkpoints
# ------------------------------------------------------------------------------------------------


@dataclass
class TrainState:
    step: int = 0
    samples_seen: int = 0
    wall_seconds: float = 0.0

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    def load_state_dict(self, d: dict) -> None:
        for k, v in d.items():
            setattr(self, k, v)


class CheckpointManager:
    """Atomic, rotated checkpoints under ``run_dir/checkpoints``."""

    def __init__(self, run_dir: Path, keep: int):
        self.dir = Path(run_dir) / "checkpoints"
        self.keep = max(1, keep)

    def complete(self) -> list[Path]:
        if not self.dir.is_dir():
            return []
        out = [p for p in self.dir.iterdir() if CHECKPOINT_RE.match(p.name) and (p / COMPLETE_MARKER).is_file()]
        return sorted(out, key=lambda p: p.name)

    def latest(self) -> Path | None:
        done = self.complete()
        return done[-1] if done else None

    def sweep_partial(self) -> None:
        """Delete ``step-*.tmp`` folders: partial writes of a killed run (never loaded: no marker, never renamed)."""
        if self.dir.is_dir():
            for stale in self.dir.glob("step-*.tmp"):
                shutil.rmtree(stale, ignore_errors=True)

    def save(self, accelerator: Accelerator, step: int, extra: dict | None = None) -> Path:
        final = self.dir / f"step-{step:07d}"
        tmp = self.dir / f"step-{step:07d}.tmp"
        if accelerator.is_main_process:
            self.dir.mkdir(parents=True, exist_ok=True)
            self.sweep_partial()
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            (tmp / "meta.json").write_text(json.dumps({"step": step, **(extra or {})}, indent=2))
            (tmp / COMPLETE_MARKER).write_text(time.strftime("%Y-%m-%dT%H:%M:%S"))
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            for old in self.complete()[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        accelerator.wait_for_everyone()
        return final


def resume(accelerator: Accelerator, manager: CheckpointManager, state: TrainState) -> bool:
    """Load the newest complete checkpoint if any (partial ``.tmp`` folders are ignored)."""
    if accelerator.is_main_process:
        manager.sweep_partial()
    accelerator.wait_for_everyone()
    ckpt = manager.latest()
    if ckpt is None:
        return False
    accelerator.load_state(str(ckpt))
    logger.info(f"resumed from {ckpt} (step {state.step}, {state.samples_seen} samples seen)")
    return True


def make_ema(params: Iterable[torch.nn.Parameter], decay: float):
    """diffusers' EMAModel over the *synced* initial weights (it gathers ZeRO-3 shards itself)."""
    from diffusers.training_utils import EMAModel

    return EMAModel(list(params), decay=decay, foreach=False)


class EMACheckpoint:
    """Adapter so accelerate's ``register_for_checkpointing`` saves the EMA shadow weights."""

    def __init__(self, ema):
        self.ema = ema

    def state_dict(self) -> dict:
        return self.ema.state_dict()

    def load_state_dict(self, d: dict) -> None:
        self.ema.load_state_dict(d)


def drop_unused_parameters(params: list[torch.nn.Parameter], loss_fn) -> list[torch.nn.Parameter]:
    """Freeze trainable parameters that receive no gradient from ``loss_fn()`` and return the rest.

    Example: the reference UNet's last transformer block after its ``attn1`` input never reaches the bank.
    DDP requires every trainable parameter to get a gradient each step; freezing them (they would never
    change anyway) is exact and cheaper than ``find_unused_parameters=True``. One extra forward/backward.
    """
    for p in params:
        p.grad = None
    loss_fn().backward()
    used = [p for p in params if p.grad is not None]
    for p in params:
        if p.grad is None:
            p.requires_grad_(False)
        p.grad = None
    return used


def check_finite(accelerator: Accelerator, loss: torch.Tensor, step: int, manager: CheckpointManager) -> None:
    """Stop every process with one clear message if any process's loss is NaN/inf."""
    flag = torch.tensor([0.0 if torch.isfinite(loss.detach()).all() else 1.0], device=loss.device)
    if accelerator.num_processes > 1:
        flag = accelerator.reduce(flag, reduction="sum")
    if flag.item() > 0:
        last = manager.latest()
        raise NonFiniteLossError(
            f"non-finite loss ({loss.detach().float().item()}) in step {step + 1}: training stopped without saving. "
            f"The last good checkpoint is {last or 'none (no checkpoint yet)'}; re-running resumes from it. "
            f"Check the data for NaN/inf or lower train.lr.")


def backward_step(accelerator: Accelerator, loss: torch.Tensor, params: list[torch.nn.Parameter], optimizer,
                  train: TrainConfig, state: TrainState, manager: CheckpointManager) -> float | None:
    """One micro-step inside ``accelerator.accumulate``: NaN guard, backward, clip + norm at the sync step, optimiser.

    Returns the all-reduced gradient norm at the sync step, else None.
    """
    check_finite(accelerator, loss, state.step, manager)
    accelerator.backward(loss)
    norm = grad_norm(accelerator, params, train.max_grad_norm) if accelerator.sync_gradients else None
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm


def advance(state: TrainState, train: TrainConfig, t_start: float) -> None:
    """Count one optimiser step in samples seen (DESIGN §3.5)."""
    state.step += 1
    state.samples_seen += train.batch_size
    state.wall_seconds = time.time() - t_start


def grad_norm(accelerator: Accelerator, params: list[torch.nn.Parameter], max_norm: float) -> float:
    """Total gradient norm after the all-reduce (before clipping); clips when ``max_norm > 0``."""
    if max_norm > 0:
        return float(accelerator.clip_grad_norm_(params, max_norm))
    grads = [p.grad.detach().float().norm() for p in params if p.grad is not None]
    return float(torch.stack(grads).norm()) if grads else 0.0


def append_metrics(accelerator: Accelerator, run_dir: Path, step: int, values: dict) -> None:
    """Append one JSON line per logged step to ``run_dir/metrics.jsonl`` (rank 0): a tracker-independent record."""
    if not accelerator.is_main_process:
        return
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    with open(Path(run_dir) / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": step, **{k: float(v) for k, v in values.items()}}) + "\n")


def lr_scheduler(optimizer, train: TrainConfig):
    from diffusers.optimization import get_scheduler

    return get_scheduler(train.lr_schedule, optimizer=optimizer, num_warmup_steps=train.lr_warmup_steps, num_training_steps=train.max_steps)


def init_tracker(accelerator: Accelerator, train: TrainConfig, run_name: str, cfg) -> None:
    if train.tracker == "none":
        return
    accelerator.init_trackers(train.wandb_project, config=config_lib.to_dict(cfg),
                              init_kwargs={"wandb": {"name": run_name, "dir": str(Path(train.run_dir).resolve())}})


def log_images(accelerator: Accelerator, key: str, image, step: int) -> None:
    """Log a uint8 (H, W, 3) image to W&B (rank 0 only)."""
    if not accelerator.is_main_process or accelerator.trackers == []:
        return
    try:
        import wandb

        tracker = accelerator.get_tracker("wandb", unwrap=True)
        tracker.log({key: wandb.Image(image)}, step=step)
    except Exception as e:  # tracking must never kill a run
        logger.warning(f"could not log {key}: {e}")


def log_video(accelerator: Accelerator, key: str, frames, fps: float, step: int) -> None:
    """Log a uint8 (F, H, W, 3) video to W&B (rank 0 only)."""
    if not accelerator.is_main_process or accelerator.trackers == []:
        return
    try:
        import tempfile

        import wandb

        from infer.io import write_gif

        # wandb.Video(array) needs moviepy; a GIF file written by us does not.
        with tempfile.TemporaryDirectory() as tmp:
            gif = write_gif(Path(tmp) / "video.gif", frames, fps)
            tracker = accelerator.get_tracker("wandb", unwrap=True)
            tracker.log({key: wandb.Video(str(gif), format="gif")}, step=step)
    except Exception as e:
        logger.warning(f"could not log {key}: {e}")


def ensure_dataset(data: DataConfig, accelerator: Accelerator) -> Path:
    """The dataset folder; the main process generates the synthetic default when it is missing."""
    path = Path(data.path)
    if not path.exists():
        if data.generate_clips <= 0:
            raise FileNotFoundError(f"dataset {path} not found; generate one with `python -m portrait.data.synthetic --out {path} --clips 2000`")
        if accelerator.is_main_process:
            from portrait.data.synthetic import generate_dataset

            logger.info(f"generating {data.generate_clips} synthetic clips at {path} ...")
            generate_dataset(path, data.generate_clips, size=data.size, num_frames=data.clip_frames, seed=data.seed, progress=True)
        accelerator.wait_for_everyone()
    return path


def train_split(data: DataConfig, path: Path):
    """The training clips: ``path``'s train split, or, with ``data.extra_train``, that split followed by the train
    splits of the extra folders (a ``datasets.Dataset``; ``ClipDataset`` takes either).

    Raises ``ValueError`` when the folders do not share frame size and clip length, or when an identity of an extra
    folder is also in another folder (the same folder twice, or the same synthetic seed): an identity of ``path``'s
    val/test splits inside the training set would leak the held-out identities into training.
    """
    if not data.extra_train:
        return path
    import datasets
    import numpy as np

    from portrait.data.dataset import check_features, load_split

    def ids(ds) -> set[int]:
        return set(np.asarray(ds.with_format("arrow").select_columns(["identity"])[:]["identity"].to_numpy()).tolist())

    base = load_split(path, "train")
    shape = check_features(base.features, where=f"{path}[train]")
    parts, seen = [base], {str(path): ids(base)}
    for split in ("val", "test"):
        try:
            seen[f"{path}[{split}]"] = ids(load_split(path, split))
        except KeyError:
            pass
    for extra in data.extra_train:
        ds = load_split(extra, "train")
        other = check_features(ds.features, where=f"{extra}[train]")
        if other != shape:
            raise ValueError(f"data.extra_train {extra}: clips of {other} (frames, height, width), but {path} has {shape}")
        mine = ids(ds)
        for name, known in seen.items():
            clash = mine & known
            if clash:
                raise ValueError(f"data.extra_train {extra}: {len(clash)} of its train identities are also in {name} "
                                 "(the same folder twice, or generated with the same seed); use a folder of other identities, "
                                 "e.g. `python -m portrait.data.synthetic --seed 1`")
        seen[str(extra)] = mine
        parts.append(ds)
    return datasets.concatenate_datasets(parts)


def write_run_config(run_dir: Path, cfg, accelerator: Accelerator) -> None:
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        text = config_lib.dump(cfg)
        (run_dir / "config.yaml").write_text(text)
        print(text)


def schedule_due(step: int, every: int, max_steps: int) -> bool:
    return step == max_steps or (every > 0 and step % every == 0)


def lr_of(optimizer) -> float:
    return optimizer.param_groups[0]["lr"]


def format_eta(done: int, total: int, seconds: float) -> str:
    if done <= 0:
        return "?"
    rem = seconds / done * (total - done)
    return f"{int(rem // 60)}m{int(rem % 60):02d}s" if math.isfinite(rem) else "?"


def prepare_optimisation(accelerator: Accelerator, module: torch.nn.Module, params: list, train: TrainConfig):
    """The optimisation state every train script shares: AdamW over ``params``, the LR schedule, an EMA of
    ``params`` and a :class:`TrainState`; ``module`` is prepared by accelerate and the EMA and state are registered
    for checkpointing. Returns ``(module, optimizer, scheduler, ema, state)``.

    The accelerator is built with step_scheduler_with_optimizer=False: the scripts step the LR schedule once per
    optimiser step themselves, instead of accelerate's once per process, so the schedule is the same for any world
    size.
    """
    optimizer = torch.optim.AdamW(params, lr=train.lr, weight_decay=train.weight_decay)
    sched = lr_scheduler(optimizer, train)
    ema = make_ema(params, train.ema_decay)
    state = TrainState()
    module, optimizer, sched = accelerator.prepare(module, optimizer, sched)
    accelerator.register_for_checkpointing(EMACheckpoint(ema), state)
    return module, optimizer, sched, ema, state


def log_step(accelerator: Accelerator, run_dir: Path, tag: str, state: TrainState, loss: torch.Tensor, optimizer,
             grad_norm: float, logs: dict, extra: dict | None = None) -> dict:
    """Log one step's ``TAG/loss``, ``TAG/lr``, ``TAG/grad_norm``, ``TAG/samples_seen``, ``extra`` and the
    objective's ``logs`` (all reduced over processes) to the trackers and ``run_dir/metrics.jsonl``; return them."""
    vals = {f"{tag}/loss": accelerator.reduce(loss.detach(), "mean").item(), f"{tag}/lr": lr_of(optimizer),
            f"{tag}/grad_norm": grad_norm, f"{tag}/samples_seen": state.samples_seen, **(extra or {}),
            **{f"{tag}/{k}": float(accelerator.reduce(v.detach().float(), "mean")) for k, v in logs.items()}}
    accelerator.log(vals, step=state.step)
    append_metrics(accelerator, run_dir, state.step, vals)
    return vals


def run_loop(accelerator: Accelerator, train: TrainConfig, state: TrainState, manager: CheckpointManager, *,
             tag: str, run_dir: Path, plan: GlobalBatchPlan, dataset, stream: str, accumulate: torch.nn.Module,
             params: list[torch.nn.Parameter], optimizer, scheduler, ema, compute_loss, desc: str | None = None,
             checkpoint_extra: dict | None = None, log_extra=None, postfix: tuple[str, ...] = ("loss",),
             after_step=None) -> None:
    """The step loop every train script shares, from ``state.step`` (after a resume) to ``train.max_steps``.

    Per optimiser step: ``train.grad_accum_steps`` micro-batches from ``plan`` (``stream`` names the per-sample
    noise stream) -> ``compute_loss(batch, generators) -> (loss, logs)`` inside ``accelerator.accumulate`` -> NaN
    guard, backward, clip, optimiser step (:func:`backward_step`); then the LR schedule, the EMA and the counters.
    Every ``train.log_every`` steps it logs ``TAG/*`` (:func:`log_step`, plus ``log_extra()``) and every
    ``train.checkpoint_every`` steps it saves a checkpoint carrying ``checkpoint_extra``; ``after_step(step)`` runs
    last (sample grids, validation).
    """
    from tqdm.auto import tqdm

    bar = tqdm(total=train.max_steps, initial=state.step, desc=desc or tag, disable=not accelerator.is_main_process,
               dynamic_ncols=True)
    t_start = time.time() - state.wall_seconds
    norm_at_sync = 0.0
    while state.step < train.max_steps:
        for micro_step in range(train.grad_accum_steps):
            batch, gens = micro_batch(plan, dataset, accelerator, state.step, micro_step, train.seed, stream)
            with accelerator.accumulate(accumulate):
                loss, logs = compute_loss(batch, gens)
                norm = backward_step(accelerator, loss, params, optimizer, train, state, manager)
                norm_at_sync = norm_at_sync if norm is None else norm
        scheduler.step()
        ema.step(params)
        advance(state, train, t_start)
        bar.update(1)
        if schedule_due(state.step, train.log_every, train.max_steps):
            vals = log_step(accelerator, run_dir, tag, state, loss, optimizer, norm_at_sync, logs,
                            extra=log_extra() if log_extra else None)
            bar.set_postfix({k: f"{vals[f'{tag}/{k}']:.4f}" for k in postfix})
        if schedule_due(state.step, train.checkpoint_every, train.max_steps):
            manager.save(accelerator, state.step, {**(checkpoint_extra or {}), "samples_seen": state.samples_seen})
        if after_step is not None:
            after_step(state.step)
    bar.close()
