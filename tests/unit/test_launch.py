"""launch.sh: unknown jobs fail clearly, and FP_ACCELERATE_ARGS reaches `accelerate launch` (multi-node ranks)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from train_cli import free_port

ROOT = Path(__file__).resolve().parents[2]


def _launch(*args, **env):
    return subprocess.run(["bash", str(ROOT / "launch.sh"), *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env})


def test_unknown_job_and_missing_accelerate_config_are_clear_errors():
    r = _launch("nosuchjob")
    assert r.returncode == 2 and "unknown job 'nosuchjob'" in r.stderr
    r = _launch("teacher", FP_ACCELERATE="no_such_config")
    assert r.returncode == 2 and "configs/accelerate/no_such_config.yaml not found" in r.stderr


def test_fp_accelerate_args_are_passed_to_the_launcher():
    # accelerate rejects the made-up flag before starting any process, which proves it received it
    r = _launch("teacher", FP_ACCELERATE_ARGS="--machine_rank 0 --no_such_launcher_flag")
    assert r.returncode != 0
    assert "--no_such_launcher_flag" in r.stderr


def test_ddp_2cpu_config_starts_two_gloo_processes(tmp_path):
    # configs/accelerate/ddp_2cpu.yaml once said MULTI_CPU + use_cpu: true, which accelerate runs as ONE process:
    # FP_ACCELERATE=ddp_2cpu silently trained single-process. Launch it exactly as launch.sh does.
    script = tmp_path / "world.py"
    # Each rank writes its own file: two processes printing to one pipe can interleave their lines (CI once read
    # "rank 0 of 2 backend gloorank 1 of 2 backend gloo").
    script.write_text("import sys\nfrom pathlib import Path\nfrom accelerate import Accelerator\n"
                      "s = Accelerator().state\n"  # as portrait.training does
                      "Path(sys.argv[1], f'rank{s.process_index}.txt').write_text("
                      "f'rank {s.process_index} of {s.num_processes} backend {s.backend}')\n")
    r = subprocess.run(["accelerate", "launch", "--config_file", str(ROOT / "configs/accelerate/ddp_2cpu.yaml"),
                        "--main_process_port", free_port(), str(script), str(tmp_path)],
                       capture_output=True, text=True, timeout=180, env={**os.environ, "ACCELERATE_USE_CPU": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    lines = sorted(p.read_text() for p in tmp_path.glob("rank*.txt"))
    assert lines == ["rank 0 of 2 backend gloo", "rank 1 of 2 backend gloo"], r.stdout + r.stderr[-2000:]
