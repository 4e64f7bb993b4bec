"""The fastportrait clip dataset: schema, writer, split assignment and the training loader.

A dataset is a Hugging Face ``DatasetDict`` saved with ``save_to_disk``, one row per clip:

    frames     Array4D (F, H, W, 3) uint8   RGB video frames
    landmarks  Array3D (F, 68, 2)   float32 iBUG-68 (x, y) pixels (see portrait.data.landmarks)
    pose       Array4D (F, H, W, 3) uint8   pose drawings of the landmarks (portrait.data.pose)
    identity   int64                        person id; splits never share an identity
    fps        float32                      frame rate of the stored frames
    source     string                       where the clip came from (generator seed / video path)

``F``, ``H`` and ``W`` are fixed per dataset. Splits are "train", "val" and "test".

Reading: ``datasets``' torch *and* numpy formats turn the uint8 arrays into int64 (measured with
datasets 5.2, 8x the memory), so ``ClipDataset`` reads rows in Arrow format, views the uint8
buffers as numpy without a copy, and copies out only the frames it samples.

On disk, datasets' ArrayXD storage is nested lists with int32 offsets at every level: an RGB
pixel costs ~7 bytes (3 data + 4 offset), i.e. 1000 clips of 16x64x64 take ~0.9 GB.

Use::

    train = ClipDataset("data/synthetic64", "train", num_frames=16, strides=(1, 4), seed=0)
    loader = torch.utils.data.DataLoader(train, batch_size=4, shuffle=True, collate_fn=collate_clips)
    # per epoch, before iterating: train.set_epoch(epoch)
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import torch

from portrait.data.landmarks import NUM_LANDMARKS

FEATURE_NAMES = ("frames", "landmarks", "pose", "identity", "fps", "source")
SPLITS = ("train", "val", "test")
REFERENCE_MODES = ("random", "first", "window", "identity", "mixed")


# ----------------------------------------------------------------------------------------------
# Schema
# ----------------------------------------------------------------------------------------------


def clip_features(num_frames: int, height: int, width: int) -> datasets.Features:
    """The ``datasets.Features`` of a dataset of ``(num_frames, height, width)`` clips."""
    return datasets.Features({
        "frames": datasets.Array4D((num_frames, height, width, 3), "uint8"),
        "landmarks": datasets.Array3D((num_frames, NUM_LANDMARKS, 2), "float32"),
        "pose": datasets.Array4D((num_frames, height, width, 3), "uint8"),
        "identity": datasets.Value("int64"),
        "fps": datasets.Value("float32"),
        "source": datasets.Value("string"),
    })


def check_features(features: datasets.Features, where: str = "dataset") -> tuple[int, int, int]:
    """Raise ``ValueError`` unless ``features`` is the fastportrait schema; return ``(F, H, W)``."""
    missing = [k for k in FEATURE_NAMES if k not in features]
    if missing:
        raise ValueError(
            f"{where} is not a fastportrait dataset: missing feature(s) {missing}; it has {sorted(features)}. "
            "Make one with `python -m portrait.data.synthetic` or `python -m portrait.data.videos`.")
    frames, lmk, pose = features["frames"], features["landmarks"], features["pose"]
    if not (isinstance(frames, datasets.Array4D) and isinstance(pose, datasets.Array4D)
            and isinstance(lmk, datasets.Array3D)):
        raise ValueError(f"{where}: frames/pose must be Array4D and landmarks Array3D, got {features}")
    f, h, w, c = frames.shape
    if c != 3 or tuple(pose.shape) != (f, h, w, 3) or tuple(lmk.shape) != (f, NUM_LANDMARKS, 2):
        raise ValueError(f"{where}: inconsistent shapes frames {frames.shape}, pose {pose.shape}, "
                         f"landmarks {lmk.shape}")
    if frames.dtype != "uint8" or pose.dtype != "uint8":
        raise ValueError(f"{where}: frames/pose must be uint8, got {frames.dtype}/{pose.dtype}")
    return f, h, w


def stable_id(*parts: object) -> int:
    """A 63-bit non-negative id from any printable parts (blake2b), stable across runs and platforms.

    Identities are ``stable_id(namespace, seed, index)`` so that different seeds give disjoint
    identity sets (collision odds ~ n^2 / 2^64).
    """
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def split_counts(num_identities: int, fractions: Sequence[float]) -> list[int]:
    """Identities per split by largest remainder, giving every split with a positive fraction at
    least one identity when there are enough of them (train first, then val, then test)."""
    fr = np.asarray(fractions, dtype=np.float64)
    if fr.ndim != 1 or np.any(fr < 0) or fr.sum() <= 0:
        raise ValueError(f"split fractions must be non-negative with a positive sum, got {fractions}")
    fr = fr / fr.sum()
    raw = fr * num_identities
    counts = np.floor(raw).astype(int)
    for i in np.argsort(-(raw - counts), kind="stable")[: num_identities - counts.sum()]:
        counts[i] += 1
    # Move identities from the largest split into empty positive-fraction splits, if possible.
    for i in np.flatnonzero((counts == 0) & (fr > 0)):
        j = int(np.argmax(counts))
        if counts[j] > 1:
            counts[j] -= 1
            counts[i] += 1
    return counts.tolist()


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def _list_offsets(num_lists: int, length: int) -> pa.Array:
    # Fixed shapes give evenly spaced offsets; cached because every batch of a dataset reuses them.
    return pa.array(np.arange(0, (num_lists + 1) * length, length, dtype=np.int32))


def _nested_list_array(values: np.ndarray, shape: tuple[int, ...], ext_type: pa.ExtensionType) -> pa.Array:
    """Wrap ``values`` ``(N, *shape)`` as the nested-list storage of a datasets ArrayXD column.

    That storage is ``list<list<...<dtype>>>`` with int32 offsets at every level, so on disk a
    ``(..., 3)`` uint8 image costs ~7 bytes per pixel (3 data + 4 offset): datasets' format, not ours.
    """
    n = values.shape[0]
    arr = pa.array(np.ascontiguousarray(values).reshape(-1))
    counts = [n]
    for d in shape[:-1]:
        counts.append(counts[-1] * d)
    for level in range(len(shape) - 1, -1, -1):  # innermost lists first
        arr = pa.ListArray.from_arrays(_list_offsets(counts[level], shape[level]), arr)
    return pa.ExtensionArray.from_storage(ext_type, arr)


def clips_to_record_batch(clips: Sequence[dict], features: datasets.Features) -> pa.RecordBatch:
    """Stack clip dicts (keys = ``FEATURE_NAMES``) into one Arrow record batch of the schema."""
    schema = features.arrow_schema
    cols = []
    for name in schema.names:
        field_type = schema.field(name).type
        if name in ("frames", "pose", "landmarks"):
            feat = features[name]
            stacked = np.stack([np.asarray(c[name], dtype=feat.dtype) for c in clips])
            if stacked.shape[1:] != tuple(feat.shape):
                raise ValueError(f"{name}: clip shape {stacked.shape[1:]} != schema {feat.shape}")
            cols.append(_nested_list_array(stacked, tuple(feat.shape), field_type))
        else:
            cols.append(pa.array([c[name] for c in clips], type=field_type))
    return pa.RecordBatch.from_arrays(cols, schema=schema)


class ClipFileWriter:
    """Appends clips to one Arrow stream file of the schema (what ``Dataset.from_file`` reads).

    Builders write from worker processes, one file per chunk of clips or per video, so that the
    parent never touches pixel data. Record batches hold about 64 MB of pixels (Arrow list offsets
    are int32, so a batch must stay under 2^31 values). Use as a context manager.
    """

    def __init__(self, path: str | os.PathLike, features: datasets.Features):
        self.features = features
        clip_bytes = 2 * int(np.prod(features["frames"].shape))
        self.batch_clips = int(np.clip((64 << 20) // clip_bytes, 1, 32))
        self._sink = pa.OSFile(str(path), "wb")
        self._writer = pa.ipc.new_stream(self._sink, features.arrow_schema)
        self.count = 0

    def write(self, clips: Sequence[dict]) -> None:
        for i in range(0, len(clips), self.batch_clips):
            self._writer.write_batch(clips_to_record_batch(clips[i:i + self.batch_clips], self.features))
        self.count += len(clips)

    def close(self) -> None:
        self._writer.close()
        self._sink.close()

    def __enter__(self) -> ClipFileWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_arrow_file(path: str | os.PathLike, clips: Sequence[dict], features: datasets.Features) -> int:
    """Write clip dicts to one Arrow stream file (see ``ClipFileWriter``); returns the clip count."""
    with ClipFileWriter(path, features) as w:
        w.write(clips)
    return w.count


def save_splits(out_dir: str | os.PathLike, split_files: dict[str, list[str]],
                features: datasets.Features) -> datasets.DatasetDict:
    """Concatenate each split's Arrow files (``write_arrow_file``) and ``save_to_disk`` the DatasetDict.

    Splits with no files are saved as empty datasets (one empty shard, which ``load_from_disk`` accepts;
    zero shards it does not).
    """
    info = datasets.DatasetInfo(features=features)
    parts, num_shards = {}, {}
    for split, files in split_files.items():
        if files:
            dsets = [datasets.Dataset.from_file(str(f), info=info.copy(), split=datasets.NamedSplit(split))
                     for f in files]
            parts[split] = datasets.concatenate_datasets(dsets) if len(dsets) > 1 else dsets[0]
        else:
            parts[split] = datasets.Dataset.from_dict({k: [] for k in features}, features=features,
                                                      split=datasets.NamedSplit(split))
            num_shards[split] = 1
    dd = datasets.DatasetDict(parts)
    # The per-split "Saving the dataset" bars would drown the builder's own progress bar.
    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        dd.save_to_disk(str(out_dir), num_shards=num_shards or None)
    finally:
        if was_enabled:
            datasets.enable_progress_bars()
    return datasets.load_from_disk(str(out_dir))


@contextlib.contextmanager
def atomic_output_dir(out_dir: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory next to ``out_dir`` that is renamed onto it only on success.

    A crash or Ctrl-C leaves ``out_dir`` untouched (the ``.tmp-*`` directory is removed). With
    ``overwrite`` an existing ``out_dir`` is replaced; without it, an existing non-empty one is an error.
    """
    out = Path(out_dir).absolute()
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} already exists; pass --overwrite to replace it")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f"{out.name}.tmp-", dir=out.parent))
    except OSError as e:
        raise PermissionError(f"cannot write next to {out}: {e}") from e
    try:
        yield tmp
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f"{out.name}.old-", dir=out.parent))
            os.replace(out, old / "x")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------


def load_split(path: str | os.PathLike, split: str) -> datasets.Dataset:
    """Load one split of a saved fastportrait ``DatasetDict``, with errors that say what is wrong.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: ``path`` is not a saved DatasetDict, or its features are not the fastportrait schema.
        KeyError: the split is absent (the message lists the present ones).
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"dataset path {p} does not exist")
    if not (p / "dataset_dict.json").is_file():
        raise ValueError(
            f"{p} is not a fastportrait dataset (no dataset_dict.json; expected a DatasetDict saved with "
            "save_to_disk, e.g. by `python -m portrait.data.synthetic --out DIR`)")
    try:
        dd = datasets.load_from_disk(str(p))
    except Exception as e:  # datasets raises several types for corrupt folders
        raise ValueError(f"{p} could not be loaded as a DatasetDict: {e}") from e
    if split not in dd:
        raise KeyError(f"split {split!r} not in {p}; available: {sorted(dd)}")
    ds = dd[split]
    check_features(ds.features, where=f"{p}[{split}]")
    return ds


def _column_numpy(row: pa.Table, name: str) -> np.ndarray:
    """A one-row Arrow table's ArrayXD column as a zero-copy numpy view ``(*shape)`` in its stored dtype."""
    col = row.column(name)
    chunk = col.chunks[0] if col.num_chunks == 1 else pa.concat_arrays(col.chunks)
    storage = chunk.storage if isinstance(chunk, pa.ExtensionArray) else chunk
    shape = chunk.type.shape
    for _ in shape:
        storage = storage.flatten()
    return storage.to_numpy(zero_copy_only=True).reshape(shape)


class ClipDataset(torch.utils.data.Dataset):
    """Training windows from a fastportrait split, sampled like AniPortrait stage 2.

    Item ``i`` is clip ``i`` of the split with a random stride from ``strides`` (among those whose
    window fits), a random start, and a reference frame. All randomness comes from
    ``np.random.default_rng([seed, epoch, i])``, so the same (seed, epoch, index) gives the same
    sample in any worker, on any rank, after any resume. Call ``set_epoch`` each epoch.

    Sample (all torch tensors; images stay uint8, the training code converts to float)::

        target        (F, 3, H, W) uint8    the sampled frames
        pose          (F, 3, H, W) uint8    their pose images
        landmarks     (F, 68, 2)   float32  their landmarks, pixels
        ref_frame     (3, H, W)    uint8    reference image
        ref_pose      (3, H, W)    uint8    its pose image
        ref_landmarks (68, 2)      float32
        frame_indices (F,)         int64    indices into the stored clip
        ref_index     ()           int64    frame index within the reference clip
        ref_clip      ()           int64    item index of the reference clip (``index`` unless identity/mixed)
        stride        ()           int64
        fps           ()           float32  frame rate of the sampled window (stored fps / stride)
        identity      ()           int64
        index         ()           int64    item index

    ``F = num_frames``; stage 1 uses ``num_frames=1`` and keeps the ``F`` axis.

    Args:
        data: a ``datasets.Dataset`` of the schema, or the path of a saved DatasetDict.
        split: split name, used when ``data`` is a path.
        num_frames: frames per sample.
        strides: allowed frame strides, drawn uniformly among those that fit the clip
            (AniPortrait: stride 1, or 4 as augmentation -> ``(1, 4)``).
        reference: "random" = any frame of the stored clip, "first" = its frame 0,
            "window" = a random frame of the sampled window, "identity" = a random frame of *another* clip of
            the same identity (its own clip if the identity has one clip; a different head pose, as a portrait
            photo driven by someone's motion is), "mixed" = "random" or "identity" with equal odds.
        seed: base seed.
    """

    def __init__(self, data: datasets.Dataset | str | os.PathLike, split: str = "train", num_frames: int = 16,
                 strides: Sequence[int] = (1,), reference: str = "random", seed: int = 0):
        ds = data if isinstance(data, datasets.Dataset) else load_split(data, split)
        self.clip_frames, self.height, self.width = check_features(ds.features)
        if num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {num_frames}")
        if reference not in REFERENCE_MODES:
            raise ValueError(f"reference must be one of {REFERENCE_MODES}, got {reference!r}")
        strides = tuple(int(s) for s in strides)
        if not strides or min(strides) < 1:
            raise ValueError(f"strides must be positive integers, got {strides}")
        self.strides = tuple(s for s in strides if (num_frames - 1) * s + 1 <= self.clip_frames)
        if not self.strides:
            raise ValueError(f"no stride in {strides} fits {num_frames} frames into clips of "
                             f"{self.clip_frames} frames")
        self.num_frames = num_frames
        self.reference = reference
        self.seed = int(seed)
        self.epoch = 0
        # Arrow format: rows come back as pyarrow tables over the memory-mapped files (no decoding).
        self._rows = ds.with_format("arrow")
        self._same_identity: dict[int, np.ndarray] | None = None

    def other_clips(self, index: int) -> np.ndarray:
        """Indices of the other clips of clip ``index``'s identity (may be empty)."""
        if self._same_identity is None:
            ids = np.asarray(self._rows.select_columns(["identity"])[:]["identity"].to_numpy())
            self._ids = ids
            order = np.argsort(ids, kind="stable")
            groups = np.split(order, np.flatnonzero(np.diff(ids[order])) + 1)
            self._same_identity = {int(ids[g[0]]): g for g in groups if len(g)}
        group = self._same_identity[int(self._ids[index])]
        return group[group != index]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self._rows)

    def sample_indices(self, index: int) -> tuple[np.ndarray, int, int]:
        """The ``(frame_indices (F,), ref_index, stride)`` item ``index`` draws this epoch.

        ``ref_index`` indexes the reference clip's frames (see ``reference_clip``)."""
        rng = np.random.default_rng([self.seed, self.epoch, int(index)])
        stride = int(self.strides[rng.integers(len(self.strides))])
        span = (self.num_frames - 1) * stride + 1
        start = int(rng.integers(0, self.clip_frames - span + 1))
        frame_idx = start + stride * np.arange(self.num_frames)
        if self.reference == "random":
            ref = int(rng.integers(self.clip_frames))
        elif self.reference == "first":
            ref = 0
        elif self.reference == "window":
            ref = int(frame_idx[rng.integers(self.num_frames)])
        else:  # identity / mixed: the frame index is drawn now, the clip in reference_clip (same rng stream)
            ref = int(rng.integers(self.clip_frames))
        return frame_idx, ref, stride

    def reference_clip(self, index: int) -> int:
        """The clip item ``index`` takes its reference frame from this epoch."""
        if self.reference not in ("identity", "mixed"):
            return int(index)
        rng = np.random.default_rng([self.seed, self.epoch, int(index), 1])
        others = self.other_clips(index)
        if len(others) == 0 or (self.reference == "mixed" and rng.random() < 0.5):
            return int(index)
        return int(others[rng.integers(len(others))])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} clips")
        row = self._rows[int(index)]
        frames = _column_numpy(row, "frames")
        pose = _column_numpy(row, "pose")
        lmk = _column_numpy(row, "landmarks")
        frame_idx, ref, stride = self.sample_indices(index)
        ref_clip = self.reference_clip(index)
        if ref_clip == index:
            ref_frames, ref_poses, ref_lmk = frames, pose, lmk
        else:
            ref_row = self._rows[ref_clip]
            ref_frames, ref_poses, ref_lmk = (_column_numpy(ref_row, c) for c in ("frames", "pose", "landmarks"))

        def chw(x: np.ndarray) -> torch.Tensor:  # (..., H, W, 3) -> (..., 3, H, W), copied out of Arrow
            return torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, -3)))

        fps = row.column("fps")[0].as_py()
        return {
            "target": chw(frames[frame_idx]),
            "pose": chw(pose[frame_idx]),
            "landmarks": torch.from_numpy(lmk[frame_idx].copy()),
            "ref_frame": chw(ref_frames[ref]),
            "ref_pose": chw(ref_poses[ref]),
            "ref_landmarks": torch.from_numpy(ref_lmk[ref].copy()),
            "ref_clip": torch.tensor(ref_clip, dtype=torch.int64),
            "frame_indices": torch.from_numpy(frame_idx.astype(np.int64)),
            "ref_index": torch.tensor(ref, dtype=torch.int64),
            "stride": torch.tensor(stride, dtype=torch.int64),
            "fps": torch.tensor(fps / stride, dtype=torch.float32),
            "identity": torch.tensor(row.column("identity")[0].as_py(), dtype=torch.int64),
            "index": torch.tensor(int(index), dtype=torch.int64),
        }


def collate_clips(batch: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack samples along a new batch axis, keeping every dtype (uint8 images stay uint8).

    ``target``/``pose`` become ``(B, F, 3, H, W)``, ``ref_frame``/``ref_pose`` ``(B, 3, H, W)``,
    ``landmarks`` ``(B, F, 68, 2)``, scalars ``(B,)``.
    """
    if not batch:
        raise ValueError("cannot collate an empty batch")
    return {k: torch.stack([b[k] for b in batch]) for k in batch[0]}

