"""Long-run soak of tiny distillation on CPU (issue 8 §5): memory stays flat, checkpoints rotate, resume works at the end.

    OMP_NUM_THREADS=1 python scripts/soak.py                       # 30 minutes, the real soak
    OMP_NUM_THREADS=1 python scripts/soak.py --minutes 2 --out runs/soak/smoke.json

Runs ``train/distill.py`` (one process) with an effectively endless ``train.max_steps``, samples the RSS of the
training process every ``--sample-every`` seconds, watches ``RUN/checkpoints`` (never more than ``--keep`` complete
checkpoints, never a second partial one), then SIGKILLs it, re-runs the same command two steps past the last complete
checkpoint and checks that it resumed from there and finished. Writes a JSON report (RSS at start/end, checkpoints
written, resumes tested) and exits non-zero if a check failed.

The teacher is ``--teacher`` (default ``runs/teacher/tiny/model``) or, when that is missing, a random tiny model made
here; the data is a small synthetic set generated under the soak folder unless ``--data`` is given.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
CKPT = re.compile(r"^step-(\d{7})$")


def prepare_inputs(args, root: Path) -> tuple[Path, Path]:
    sys.path.insert(0, str(REPO))
    teacher = Path(args.teacher)
    if not (teacher / "fastportrait.json").is_file():
        teacher = root / "teacher"
        if not (teacher / "fastportrait.json").is_file():
            from portrait.models import ModelConfig, Pose2VideoModel

            print(f"{args.teacher} not found: making a random tiny teacher at {teacher}")
            Pose2VideoModel.from_config(ModelConfig(), seed=0).save_pretrained(teacher)
    data = Path(args.data) if args.data else root / "data"
    if not data.exists():
        from portrait.data.synthetic import generate_dataset

        print(f"generating {args.clips} synthetic clips at {data}")
        generate_dataset(data, args.clips, size=64, num_frames=8, seed=3, clips_per_identity=2, workers=1)
    return teacher, data


def command(args, run: Path, teacher: Path, data: Path, max_steps: int) -> list[str]:
    return [sys.executable, "train/distill.py", f"teacher={teacher}", f"train.run_dir={run}", f"export_dir={run}/model",
            f"data.path={data}", "data.generate_clips=0", "data.strides=[1]", "train.tracker=none", "train.log_every=10",
            f"train.batch_size={args.batch_size}", "num_frames=4", "teacher_sample_steps=2", "train.threads=1",
            f"train.checkpoint_every={args.checkpoint_every}", f"train.keep_checkpoints={args.keep}", "train.sample_every=0",
            f"train.max_steps={max_steps}"]


def tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def last_step(run: Path) -> int:
    f = run / "metrics.jsonl"
    if not f.is_file():
        return 0
    lines = f.read_text().splitlines()
    return json.loads(lines[-1])["step"] if lines else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--sample-every", type=float, default=10.0, help="seconds between RSS samples")
    ap.add_argument("--root", default="runs/soak", help="soak folder (run, generated teacher/data)")
    ap.add_argument("--out", default=None, help="JSON report (default ROOT/soak.json)")
    ap.add_argument("--teacher", default="runs/teacher/tiny/model")
    ap.add_argument("--data", default=None)
    ap.add_argument("--clips", type=int, default=24)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--checkpoint-every", type=int, default=20)
    ap.add_argument("--keep", type=int, default=2)
    args = ap.parse_args(argv)

    root = Path(args.root).resolve()
    run = root / "run"
    out = Path(args.out) if args.out else root / "soak.json"
    if run.exists():
        print(f"error: {run} exists; remove it or choose another --root", file=sys.stderr)
        return 2
    root.mkdir(parents=True, exist_ok=True)
    teacher, data = prepare_inputs(args, root)
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    log = open(root / "train.log", "w")
    proc = subprocess.Popen(command(args, run, teacher, data, 10**9), cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    ps = psutil.Process(proc.pid)
    t0 = time.time()
    samples, seen, problems, over_since = [], set(), [], None
    next_sample = t0
    try:
        while time.time() - t0 < args.minutes * 60:
            if proc.poll() is not None:
                problems.append(f"training exited early with code {proc.returncode} (see {root / 'train.log'})")
                break
            ck = run / "checkpoints"
            if ck.is_dir():
                names = [p.name for p in ck.iterdir()]
                complete = [n for n in names if CKPT.match(n) and (ck / n / "COMPLETE").is_file()]
                seen.update(complete)
                # keep+1 is normal for the moment between renaming a new checkpoint and deleting the oldest
                if len(complete) > args.keep:
                    over_since = over_since or time.time()
                    if time.time() - over_since > 10 or len(complete) > args.keep + 1:
                        problems.append(f"{len(complete)} complete checkpoints > keep={args.keep}: {sorted(complete)}")
                        over_since = None
                else:
                    over_since = None
                if sum(n.endswith(".tmp") for n in names) > 1:
                    problems.append(f"more than one partial checkpoint: {sorted(names)}")
            if time.time() >= next_sample:
                samples.append({"t_s": round(time.time() - t0, 1), "rss_mb": round(tree_rss(ps) / 2**20, 1), "step": last_step(run)})
                print(f"[soak] {samples[-1]}", flush=True)
                next_sample += args.sample_every
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)  # the end of the soak is a crash, on purpose
            proc.wait()
        log.close()

    # resume at the end: the same command, two steps past the last complete checkpoint
    ck = run / "checkpoints"
    complete = sorted(p.name for p in ck.iterdir() if CKPT.match(p.name) and (p / "COMPLETE").is_file()) if ck.is_dir() else []
    resume_from = int(complete[-1][5:]) if complete else 0
    r = subprocess.run(command(args, run, teacher, data, resume_from + 2), cwd=REPO, env=env, capture_output=True, text=True)
    text = r.stdout + r.stderr
    resume_ok = r.returncode == 0 and (not complete or f"resumed from {ck / complete[-1]}" in text) and last_step(run) == resume_from + 2 \
        and (run / "model" / "fastportrait.json").is_file()
    if not resume_ok:
        problems.append(f"resume from {complete[-1] if complete else 'scratch'} failed (exit {r.returncode}): {text[-1500:]}")
    if len(complete) > args.keep:
        problems.append(f"{len(complete)} complete checkpoints at the end > keep={args.keep}: {complete}")
    steady = [s for s in samples if s["step"] > 0] or samples  # start = first sample once training steps run
    report = {
        "minutes": args.minutes, "steps_trained": samples[-1]["step"] if samples else 0,
        "rss_start_mb": steady[0]["rss_mb"] if steady else None, "rss_end_mb": steady[-1]["rss_mb"] if steady else None,
        "rss_max_mb": max(s["rss_mb"] for s in steady) if steady else None,
        "rss_growth_mb": round(steady[-1]["rss_mb"] - steady[0]["rss_mb"], 1) if steady else None,
        "checkpoints_written": len(seen), "checkpoints_kept_at_end": complete, "keep_checkpoints": args.keep,
        "rotation_ok": not any("keep=" in p for p in problems),
        "resumes_tested": 1, "resume_ok": resume_ok, "resumed_from_step": resume_from, "problems": problems, "samples": samples,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items() if k != "samples"}, indent=2))
    print(f"wrote {out}")
    return 0 if not problems else 1


if __name__ == "__main__":
    raise SystemExit(main())
