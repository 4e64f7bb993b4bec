"""Issue 8 §4: bad input, tried on purpose. Each case must fail with one clear ``error:`` line naming the problem,
no traceback, and nothing written half-way.

Covered elsewhere (not repeated here):
* unknown / mistyped keys and wrong types through ``config.load``: tests/unit/test_config.py;
* AniPortrait weights with a renamed key or a wrong shape, truncated ``.pth``, missing pieces, through the importer
  CLI (one error line, no output folder): tests/unit/test_import_aniportrait.py
  (test_renamed_key_names_the_key_and_file, test_renamed_motion_key_names_the_source_key, test_wrong_shape_names_the_key,
  test_truncated_pth_names_the_file, test_missing_piece_names_the_path);
* corrupt / empty pose videos, zero pose frames, wrong model folders for ``infer.animate``:
  tests/integration/test_animate_cli.py::test_bad_inputs_fail_clearly_and_write_nothing;
* a teacher-folder component missing at the model level: tests/unit/test_models.py::test_wrong_or_incomplete_folder_is_a_clear_error.

Here: the same failures through the training CLI (subprocess: stderr, exit code, untouched run folder), a truncated
safetensors file, a truncated video, pose/clip frame counts, NaN/inf in a batch, disk full during export, and a
width manifest that disagrees with its tensors.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def dataset(train_dataset):
    return train_dataset


def distill(run_dir, teacher, data, *overrides, prelude: str | None = None) -> subprocess.CompletedProcess:
    args = [f"teacher={teacher}", f"train.run_dir={run_dir}", f"export_dir={run_dir}/model", f"data.path={data}", "data.generate_clips=0",
            "train.tracker=none", "train.log_every=1", "train.batch_size=2", "num_frames=4", "data.strides=[1]", "teacher_sample_steps=2",
            "train.lr_warmup_steps=0", "train.threads=1", "train.max_steps=2", "train.checkpoint_every=1", *overrides]
    if prelude is None:
        cmd = [sys.executable, "train/distill.py", *args]
    else:  # patch something first, then run the real script as __main__
        code = prelude + "\nimport runpy, sys\nsys.argv = ['train/distill.py', *sys.argv[1:]]\nrunpy.run_path('train/distill.py', run_name='__main__')\n"
        cmd = [sys.executable, "-c", code, *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def assert_clear_error(r: subprocess.CompletedProcess, *needles: str) -> str:
    """Non-zero exit, exactly one ``error:`` line naming the problem, no traceback."""
    assert r.returncode != 0, r.stdout[-2000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    lines = [part.strip() for line in r.stderr.splitlines() for part in line.split("\r")]  # tqdm redraws with \r
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, r.stderr[-3000:]
    for n in needles:
        assert n in errors[0], errors[0]
    return errors[0]


def tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------------
# configs through the CLI
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("override,needles", [
    ("train.lrr=1e-4", ("unknown config key 'train.lrr'",)),  # mistyped key on the command line
    pytest.param("train.max_steps=abc", ("train.max_steps", "abc"), marks=pytest.mark.slow),  # wrong type on the command line
    pytest.param("mode=lcn", ("mode must be one of", "'lcn'"), marks=pytest.mark.slow),  # wrong value
])
def test_cli_bad_override_names_the_key(tmp_path, dataset, tiny_model_dir, override, needles):
    r = distill(tmp_path / "run", tiny_model_dir, dataset, override)
    assert_clear_error(r, *needles)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("text,needles", [
    pytest.param("train:\n  max_stpes: 3\n", ("unknown config key 'train.max_stpes'", "bad.yaml"), marks=pytest.mark.slow),  # mistyped key in a file
    pytest.param("train:\n  lr: [1, 2]\n", ("train.lr", "bad.yaml"), marks=pytest.mark.slow),  # wrong type in a file
    ("- just\n- a list\n", ("must hold a mapping", "bad.yaml")),  # a config of the wrong type altogether
])
def test_cli_bad_config_file_names_key_and_file(tmp_path, dataset, tiny_model_dir, text, needles):
    (tmp_path / "bad.yaml").write_text(text)
    r = distill(tmp_path / "run", tiny_model_dir, dataset, f"--config={tmp_path / 'bad.yaml'}")
    assert_clear_error(r, *needles)
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------------
# model folders and weight files
# ------------------------------------------------------------------------------------------------


def test_teacher_missing_a_component_is_named_and_nothing_written(tmp_path, dataset, tiny_model_dir):
    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_model_dir, teacher)
    shutil.rmtree(teacher / "pose_guider")
    r = distill(tmp_path / "run", teacher, dataset)
    assert_clear_error(r, "missing the 'pose_guider/' component")
    assert not (tmp_path / "run" / "config.yaml").exists() and not (tmp_path / "run" / "checkpoints").exists()


def test_truncated_safetensors_names_the_file(tmp_path, dataset, tiny_model_dir):
    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_model_dir, teacher)
    f = teacher / "denoising_unet" / "diffusion_pytorch_model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    r = distill(tmp_path / "run", teacher, dataset)
    assert_clear_error(r, "denoising_unet/diffusion_pytorch_model.safetensors")
    assert not (tmp_path / "run" / "config.yaml").exists()
    # the same file through inference: one error line, no output video
    from infer import animate

    out = tmp_path / "out.mp4"
    import contextlib
    import io

    from PIL import Image

    from infer.io import write_video

    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "ref.png")
    write_video(tmp_path / "pose.mp4", np.zeros((3, 64, 64, 3), np.uint8), fps=10)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = animate.main(["--model", str(teacher), "--ref", str(tmp_path / "ref.png"), "--pose", str(tmp_path / "pose.mp4"),
                             "--out", str(out), "--steps", "1"])
    assert code == 2 and "diffusion_pytorch_model.safetensors" in err.getvalue() and "Traceback" not in err.getvalue()
    assert not out.exists()


def test_pruned_manifest_that_disagrees_with_its_tensors(tmp_path, tiny_model_dir):
    """Expected API (pruning engineer): ``portrait.models.widths.load_unet`` / ``WidthManifestError`` and
    ``Pose2VideoModel.from_pretrained`` reading ``denoising_unet/widths.json``."""
    widths = pytest.importorskip("portrait.models.widths", reason="prune has no width-manifest support yet (portrait.models.widths)")
    if not all(hasattr(widths, n) for n in ("load_unet", "WidthManifestError", "MANIFEST", "KIND")):
        pytest.skip("portrait.models.widths lacks load_unet / WidthManifestError")
    from diffusers import UNetMotionModel
    from torch import nn

    from portrait.models import Pose2VideoModel
    from portrait.models.bundle import ModelFolderError

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    unet = UNetMotionModel.from_pretrained(model / "denoising_unet")
    name, conv = next((n, m) for n, m in unet.named_modules() if isinstance(m, nn.Conv2d) and ".resnets." in n and n.endswith("conv1"))
    manifest = {"format_version": 1, "kind": widths.KIND,
                "layers": {name: {"type": "Conv2d", "in": conv.in_channels, "out": conv.out_channels // 2}}, "norm_groups": {}, "heads": {}}
    (model / "denoising_unet" / widths.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(widths.WidthManifestError, match="disagrees with the tensors"):
        widths.load_unet(model / "denoising_unet")
    with pytest.raises((widths.WidthManifestError, ModelFolderError), match=name.split(".")[0]):
        Pose2VideoModel.from_pretrained(model)


# ------------------------------------------------------------------------------------------------
# videos and frame counts
# ------------------------------------------------------------------------------------------------


def test_truncated_video_is_an_input_error(tmp_path):
    from infer.io import InputError, read_pose, write_video

    rng = np.random.default_rng(0)
    write_video(tmp_path / "ok.mp4", (rng.random((12, 64, 64, 3)) * 255).astype(np.uint8), fps=10)
    data = (tmp_path / "ok.mp4").read_bytes()
    (tmp_path / "cut.mp4").write_bytes(data[: len(data) // 3])
    with pytest.raises(InputError, match="cut.mp4"):
        read_pose(tmp_path / "cut.mp4", 64)


def test_clip_frames_fewer_than_requested_is_named(tmp_path, dataset, tiny_model_dir):
    # the dataset's clips hold 8 frames; asking for 16 per training clip must say so, not crash mid-run
    r = distill(tmp_path / "run", tiny_model_dir, dataset, "num_frames=16")
    assert_clear_error(r, "num_frames=16", "clips of 8 frames")
    assert not (tmp_path / "run" / "config.yaml").exists()


# ------------------------------------------------------------------------------------------------
# NaN / inf in a batch, disk full during export
# ------------------------------------------------------------------------------------------------

POISON = """
import torch
from portrait import training as T
_load = T.load_items
def load_items(dataset, items):
    batch = _load(dataset, items)
    if int(batch["sample_id"].min()) >= 2:  # the batch of step 2 (global batch 2)
        batch["target"] = batch["target"].float()
        batch["target"][0, 0, 0, 0, 0] = float("{value}")
    return batch
T.load_items = load_items
"""


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_non_finite_batch_stops_and_keeps_last_good_checkpoint(tmp_path, dataset, tiny_model_dir, value):
    run = tmp_path / "run"
    r = distill(run, tiny_model_dir, dataset, "train.max_steps=3", prelude=POISON.replace("{value}", value))
    assert_clear_error(r, "non-finite loss", "in step 2", "step-0000001")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-0000001"]
    assert (run / "checkpoints" / "step-0000001" / "COMPLETE").is_file()
    assert not (run / "model").exists() and not (run / "DONE").exists()


DISK_FULL = """
import errno, os
from diffusers import UNetMotionModel
def save_pretrained(self, path, *a, **k):
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "diffusion_pytorch_model.safetensors"), "wb") as f:
        f.write(b"\\0" * 1000)  # the disk fills up half-way through the largest file
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.path.join(path, "diffusion_pytorch_model.safetensors"))
UNetMotionModel.save_pretrained = save_pretrained
"""


def test_disk_full_during_export_keeps_the_previous_export(tmp_path, dataset, tiny_model_dir):
    run = tmp_path / "run"
    shutil.copytree(tiny_model_dir, run / "model")  # a previous export
    before = tree_digest(run / "model")
    r = distill(run, tiny_model_dir, dataset, "train.max_steps=1", prelude=DISK_FULL)
    assert_clear_error(r, os.strerror(errno.ENOSPC))
    assert tree_digest(run / "model") == before  # untouched
    assert not [p.name for p in run.iterdir() if p.name.startswith(".model")]  # no temp folder left
    assert not (run / "DONE").exists()
    assert (run / "checkpoints" / "step-0000001" / "COMPLETE").is_file()  # the training itself is kept: re-run exports
