"""Running a ``train/`` script the way users do (by path, or as ``python -m train.JOB``) from the integration tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]


def run_train_script(job: str, args: list[str], *, module: bool = False, check: bool = True, timeout: int = 900,
                     env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run ``train/JOB.py`` with ``args`` in the repository root; with ``check``, fail the test on a non-zero exit
    and show the tail of its output. ``env`` is added to the current environment."""
    cmd = [sys.executable, "-m", f"train.{job}"] if module else [sys.executable, f"train/{job}.py"]
    r = subprocess.run(cmd + list(args), cwd=REPO, capture_output=True, text=True, timeout=timeout,
                       env=dict(os.environ, **(env or {})))
    if check:
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def component_weights(model_dir, comp: str = "denoising_unet") -> dict:
    """The safetensors state dict of one component of an exported model folder."""
    return load_file(str(Path(model_dir) / comp / "diffusion_pytorch_model.safetensors"))


def free_port() -> str:
    """A TCP port nothing listens on now, for ``accelerate launch --main_process_port``: the default 29500 can still be
    held by the previous test's process group, which failed a launch once in a full-suite run."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])
