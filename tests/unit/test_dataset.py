"""Dataset schema, loading errors, and the ClipDataset sampler (uint8, strides, references, determinism)."""

from __future__ import annotations

import datasets
import numpy as np
import pytest
import torch

from portrait.data import landmarks as L
from portrait.data.dataset import (
    ClipDataset,
    atomic_output_dir,
    clip_features,
    collate_clips,
    load_split,
    split_counts,
    stable_id,
)
from portrait.data.synthetic import generate_dataset

F, S = 16, 24


@pytest.fixture(scope="module")
def ds_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "syn"
    generate_dataset(path, num_clips=8, size=S, num_frames=F, clips_per_identity=2, workers=1)
    return path


@pytest.fixture(scope="module")
def stored(ds_path):
    """Train split as plain numpy arrays (through the numpy formatter, which upcasts to int64)."""
    ds = load_split(ds_path, "train").with_format("numpy")
    return {k: np.asarray(ds[k]) for k in ("frames", "landmarks", "pose", "identity")}


def test_load_split_errors(ds_path, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_split(tmp_path / "missing", "train")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a fastportrait dataset"):
        load_split(tmp_path / "empty", "train")
    with pytest.raises(KeyError, match="available"):
        load_split(ds_path, "nope")
    other = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"image": [1, 2]})})
    other.save_to_disk(str(tmp_path / "other"))
    with pytest.raises(ValueError, match="missing feature"):
        load_split(tmp_path / "other", "train")
    ds = load_split(ds_path, "train")
    assert ds.features == clip_features(F, S, S)


def test_samples_are_uint8_with_documented_layout(ds_path, stored):
    data = ClipDataset(ds_path, "train", num_frames=4, strides=(1,), seed=0)
    assert len(data) == len(stored["identity"]) == 4
    s = data[1]
    assert s["target"].dtype == torch.uint8 and s["target"].shape == (4, 3, S, S)
    assert s["pose"].dtype == torch.uint8 and s["pose"].shape == (4, 3, S, S)
    assert s["ref_frame"].dtype == torch.uint8 and s["ref_frame"].shape == (3, S, S)
    assert s["ref_pose"].dtype == torch.uint8 and s["ref_pose"].shape == (3, S, S)
    assert s["landmarks"].dtype == torch.float32 and s["landmarks"].shape == (4, 68, 2)
    assert s["ref_landmarks"].shape == (68, 2)
    idx = s["frame_indices"].numpy()
    # Pixels and landmarks are the stored ones at the sampled indices, channels first.
    np.testing.assert_array_equal(s["target"].numpy(), stored["frames"][1][idx].transpose(0, 3, 1, 2))
    np.testing.assert_array_equal(s["pose"].numpy(), stored["pose"][1][idx].transpose(0, 3, 1, 2))
    np.testing.assert_array_equal(s["landmarks"].numpy(), stored["landmarks"][1][idx])
    ref = int(s["ref_index"])
    np.testing.assert_array_equal(s["ref_frame"].numpy(), stored["frames"][1][ref].transpose(2, 0, 1))
    assert int(s["identity"]) == stored["identity"][1]
    assert float(s["fps"]) == pytest.approx(25.0)


def _match_frames(sample_lmk: np.ndarray, clip_lmk: np.ndarray) -> list[int]:
    """Recover frame indices by matching each sampled landmark set against the stored sequence."""
    out = []
    for lm in sample_lmk:
        hits = np.flatnonzero(np.all(clip_lmk == lm, axis=(1, 2)))
        assert len(hits) == 1
        out.append(int(hits[0]))
    return out


@pytest.mark.parametrize("stride", [1, 2, 3, 4])
def test_stride_respected(ds_path, stored, stride):
    data = ClipDataset(ds_path, "train", num_frames=4, strides=(stride,), seed=3)
    for i in range(len(data)):
        for epoch in range(3):
            data.set_epoch(epoch)
            s = data[i]
            idx = _match_frames(s["landmarks"].numpy(), stored["landmarks"][i])
            assert np.all(np.diff(idx) == stride), idx
            assert idx == s["frame_indices"].tolist() and int(s["stride"]) == stride
            assert float(s["fps"]) == pytest.approx(25.0 / stride)


def test_stride_mix_offsets_and_infeasible(ds_path):
    data = ClipDataset(ds_path, "train", num_frames=4, strides=(1, 4), seed=0)
    seen_strides, seen_starts = set(), set()
    for epoch in range(20):
        data.set_epoch(epoch)
        for i in range(len(data)):
            s = data[i]
            seen_strides.add(int(s["stride"]))
            seen_starts.add(int(s["frame_indices"][0]))
    assert seen_strides == {1, 4} and len(seen_starts) > 5
    # 16 frames at stride 4 do not fit 16-frame clips: only stride 1 is kept.
    assert ClipDataset(ds_path, "train", num_frames=16, strides=(1, 4)).strides == (1,)
    with pytest.raises(ValueError, match="no stride"):
        ClipDataset(ds_path, "train", num_frames=16, strides=(2,))


def test_determinism_by_seed_epoch_index(ds_path):
    a = ClipDataset(ds_path, "train", num_frames=3, strides=(1, 2, 3), seed=5)
    b = ClipDataset(ds_path, "train", num_frames=3, strides=(1, 2, 3), seed=5)
    for i in range(len(a)):
        sa, sb = a[i], b[i]
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    # Order independence (what resume relies on): item 2 first or last gives the same sample.
    fresh = ClipDataset(ds_path, "train", num_frames=3, strides=(1, 2, 3), seed=5)
    assert torch.equal(fresh[2]["frame_indices"], a[2]["frame_indices"])
    draws = lambda d: [(tuple(d[i]["frame_indices"].tolist()), int(d[i]["ref_index"])) for i in range(len(d))]  # noqa: E731
    base = draws(a)
    a.set_epoch(1)
    other_seed = ClipDataset(ds_path, "train", num_frames=3, strides=(1, 2, 3), seed=6)
    assert draws(a) != base and draws(other_seed) != base


def test_reference_modes(ds_path, stored):
    first = ClipDataset(ds_path, "train", num_frames=2, reference="first")[0]
    assert int(first["ref_index"]) == 0
    np.testing.assert_array_equal(first["ref_landmarks"].numpy(), stored["landmarks"][0][0])
    for epoch in range(5):
        d = ClipDataset(ds_path, "train", num_frames=2, strides=(4,), reference="window", seed=epoch)
        s = d[1]
        assert int(s["ref_index"]) in s["frame_indices"].tolist()
    refs = {int(ClipDataset(ds_path, "train", num_frames=2, reference="random", seed=k)[0]["ref_index"])
            for k in range(30)}
    assert len(refs) > 5  # any frame of the clip, not just the window or frame 0
    with pytest.raises(ValueError, match="reference"):
        ClipDataset(ds_path, "train", reference="last")


def test_identity_and_mixed_references_come_from_the_same_identity(ds_path, stored):
    ids = stored["identity"]
    ident = ClipDataset(ds_path, "train", num_frames=2, reference="identity", seed=0)
    for i in range(len(ident)):
        s = ident[i]
        j, k = int(s["ref_clip"]), int(s["ref_index"])
        assert j != i and ids[j] == ids[i]  # another clip of the same person (2 clips per identity here)
        np.testing.assert_array_equal(s["ref_frame"].permute(1, 2, 0).numpy(), stored["frames"][j][k])
        np.testing.assert_array_equal(s["ref_landmarks"].numpy(), stored["landmarks"][j][k])
    own = [int(ClipDataset(ds_path, "train", num_frames=2, reference="mixed", seed=k)[0]["ref_clip"]) == 0 for k in range(40)]
    assert 5 < sum(own) < 35  # both sources occur
    assert all(int(ClipDataset(ds_path, "train", num_frames=2, reference="random")[i]["ref_clip"]) == i for i in range(3))


def test_single_frame_and_collate(ds_path):
    data = ClipDataset(ds_path, "train", num_frames=1)
    s = data[0]
    assert s["target"].shape == (1, 3, S, S)
    loader = torch.utils.data.DataLoader(ClipDataset(ds_path, "train", num_frames=4), batch_size=3,
                                         collate_fn=collate_clips, num_workers=0)
    batch = next(iter(loader))
    assert batch["target"].shape == (3, 4, 3, S, S) and batch["target"].dtype == torch.uint8
    assert batch["ref_frame"].shape == (3, 3, S, S) and batch["ref_frame"].dtype == torch.uint8
    assert batch["landmarks"].shape == (3, 4, 68, 2) and batch["stride"].shape == (3,)


def test_landmark_helpers():
    lmk = np.zeros((68, 2))
    lmk[36:42] = [[0, 0], [1, -1], [2, -1], [3, 0], [2, 1], [1, 1]]
    lmk[42:48] = lmk[36:42] + [10, 0]
    lmk[48:60] = np.c_[np.linspace(20, 30, 12), np.full(12, 20.0)]
    lmk[60:68] = [[21, 20], [23, 19], [25, 19], [27, 19], [29, 20], [27, 21], [25, 21], [23, 21]]
    assert L.inter_ocular_distance(lmk) == pytest.approx(10.0)
    assert L.eye_opening(lmk) == pytest.approx(2 / 3)
    assert L.mouth_opening(lmk) == pytest.approx(0.2)
    assert L.mouth_box(lmk, 64, margin=0.1) == (19, 19, 31, 21)
    assert L.mouth_box(lmk, 25, margin=0.1)[2] == 25  # clipped to the image
    batch = np.stack([lmk, lmk * 2])
    np.testing.assert_allclose(L.inter_ocular_distance(batch), [10.0, 20.0])
    with pytest.raises(ValueError):
        L.mouth_opening(np.zeros((5, 2)))


def test_split_counts_and_ids():
    assert split_counts(10, (0.8, 0.1, 0.1)) == [8, 1, 1]
    assert split_counts(3, (0.8, 0.1, 0.1)) == [1, 1, 1]
    assert split_counts(1, (0.8, 0.1, 0.1)) == [1, 0, 0]
    assert sum(split_counts(1001, (0.7, 0.2, 0.1))) == 1001
    assert stable_id("a", 1) == stable_id("a", 1) != stable_id("a", 2)
    assert 0 <= stable_id("x") < 2 ** 63


def test_atomic_output_dir_cleans_up(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_output_dir(tmp_path / "out") as tmp:
            (tmp / "partial").write_text("x")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    with atomic_output_dir(tmp_path / "out") as tmp:
        (tmp / "a").write_text("1")
    with atomic_output_dir(tmp_path / "out", overwrite=True) as tmp:
        (tmp / "b").write_text("2")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["b"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_extra_train_folders_append_identities_and_refuse_leaks(ds_path, tmp_path):
    from portrait.training import DataConfig, train_split

    assert train_split(DataConfig(path=str(ds_path)), ds_path) == ds_path  # no extras: the folder itself
    extra = tmp_path / "seed7"
    generate_dataset(extra, num_clips=8, size=S, num_frames=F, clips_per_identity=2, seed=7, workers=1)
    merged = train_split(DataConfig(path=str(ds_path), extra_train=[str(extra)]), ds_path)
    base, more = load_split(ds_path, "train"), load_split(extra, "train")
    assert len(merged) == len(base) + len(more)
    ds = ClipDataset(merged, num_frames=2, reference="identity")
    assert set(ds[len(ds) - 1]["identity"].reshape(-1).tolist()) <= set(more["identity"])
    # the other clip of an extra identity comes from the same extra identity
    last = len(ds) - 1
    assert all(merged[int(o)]["identity"] == merged[last]["identity"] for o in ds.other_clips(last))
    # the same seed again (here: the base folder itself) would train on identities it already has, or on its held-out ones
    with pytest.raises(ValueError, match="also in"):
        train_split(DataConfig(path=str(ds_path), extra_train=[str(ds_path)]), ds_path)
    small = tmp_path / "small"
    generate_dataset(small, num_clips=4, size=S // 2, num_frames=F, clips_per_identity=2, seed=8, workers=1)
    with pytest.raises(ValueError, match="clips of"):
        train_split(DataConfig(path=str(ds_path), extra_train=[str(small)]), ds_path)
