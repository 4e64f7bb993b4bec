"""`python -m infer.evaluate` on a fresh tiny model: rows, baselines, report files, samples."""

from __future__ import annotations

import json

import numpy as np
import pytest


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    from portrait.data.synthetic import generate_dataset

    path = tmp_path_factory.mktemp("evaldata") / "syn"
    generate_dataset(path, 20, size=64, num_frames=8, seed=11, clips_per_identity=2, workers=1)
    return path


def test_evaluate_writes_rows_baselines_and_samples(tiny_model_dir, small_data, tmp_path):
    from infer import evaluate

    out = tmp_path / "eval.json"
    code = evaluate.main(["--model", str(tiny_model_dir), "--data", str(small_data), "--split", "test", "--clips", "2",
                          "--frames", "8", "--row", "a:steps=1,guidance=3.5", "--row", "b:steps=2,guidance=1",
                          "--out", str(out), "--samples", str(tmp_path / "samples")])
    assert code == 0
    result = json.loads(out.read_text())
    assert set(result["rows"]) == {"copy_reference", "probe_on_ground_truth", "a", "b"}
    for name in ("a", "b", "copy_reference"):
        row = result["rows"][name]
        for key in ("psnr_gt", "ssim_gt", "mouth_psnr", "flicker", "landmark_error"):
            assert key in row and row[key] == row[key]  # present and not NaN
    assert result["rows"]["a"]["steps"] == 1 and result["rows"]["b"]["guidance"] == 1.0
    assert result["rows"]["a"]["sampler"] == "ddim"
    # the copy baseline reproduces frame 0 exactly, so it cannot be worse than a random untrained model
    assert result["rows"]["copy_reference"]["psnr_gt"] > result["rows"]["a"]["psnr_gt"]
    assert out.with_suffix(".md").read_text().startswith("| row |")
    assert sorted(p.suffix for p in (tmp_path / "samples").iterdir()) == [".gif", ".gif", ".png", ".png"]


def test_bad_row_is_a_clear_error(tiny_model_dir, small_data, capsys):
    from infer import evaluate

    assert evaluate.main(["--model", str(tiny_model_dir), "--data", str(small_data), "--row", "x:stepz=3"]) == 2
    assert "stepz" in capsys.readouterr().err


def test_cross_protocol_takes_the_reference_from_another_clip_of_the_identity(small_data):
    from infer.evaluate import load_eval_clips
    from portrait.data.dataset import ClipDataset

    own = load_eval_clips(small_data, "test", clips=2, frames=8, protocol="self")
    cross = load_eval_clips(small_data, "test", clips=2, frames=8, protocol="cross")
    ds = ClipDataset(small_data, "test", num_frames=8, strides=(1,), reference="first")
    for o, c in zip(own, cross):
        np.testing.assert_array_equal(o.pose, c.pose)  # same driving poses and ground truth
        assert not np.array_equal(o.ref, c.ref)
        assert int(ds[int(ds.other_clips(c.index)[0])]["identity"]) == int(ds[c.index]["identity"])
    with pytest.raises(ValueError, match="protocol"):
        load_eval_clips(small_data, "test", clips=1, frames=8, protocol="other")


def test_x0_probe_reports_per_timestep_psnr_and_checks_folders_first(tiny_model_dir, small_data, tmp_path, capsys):
    from infer import x0_probe

    out = tmp_path / "probe.json"
    code = x0_probe.main(["--model", str(tiny_model_dir), "--data", str(small_data), "--clips", "2", "--frames", "4",
                          "--timesteps", "999", "500", "0", "--out", str(out)])
    assert code == 0
    r = json.loads(out.read_text())["results"][str(tiny_model_dir)]
    t = {int(k): v for k, v in r["t"].items()}
    assert set(t) == {999, 500, 0}
    # x_0 ~ the clean latents at t = 0 whatever the (untrained) UNet says, so the probe reproduces the VAE round trip
    assert abs(t[0] - r["vae"]) < 0.5
    # a bad folder in the list is refused before any model is run
    bad = tmp_path / "not_a_model"
    bad.mkdir()
    assert x0_probe.main(["--model", str(tiny_model_dir), "--model", str(bad), "--data", str(small_data)]) == 2
    assert "not_a_model" in capsys.readouterr().err
    assert x0_probe.main(["--model", str(tiny_model_dir), "--data", str(small_data), "--timesteps", "1000"]) == 2
