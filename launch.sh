#!/usr/bin/env bash
# One entry for every job:  bash launch.sh <job> [--config PATH] [key=value ...]
#   jobs: teacher distill prune interpolator decoder bench quickstart test
# Training jobs run under `accelerate launch` with configs/accelerate/$FP_ACCELERATE.yaml
# (default: single, one CPU or GPU process). Examples:
#   bash launch.sh teacher                                   # tiny teacher on CPU, embedded default
#   FP_ACCELERATE=ddp_2cpu bash launch.sh distill            # 2-process gloo DDP on CPU
#   FP_ACCELERATE=deepspeed_zero2 bash launch.sh distill --config configs/distill/aniportrait_4step.yaml
#   FP_ACCELERATE=ddp_2node_8gpu FP_ACCELERATE_ARGS="--machine_rank 1 --main_process_ip 10.0.0.1" bash launch.sh distill ...
set -euo pipefail
cd "$(dirname "$0")"
job="${1:-}"
if [[ -z "$job" ]]; then
  sed -n '2,9p' "$0"; exit 2
fi
shift
acc_cfg="configs/accelerate/${FP_ACCELERATE:-single}.yaml"
train_job() {
  if [[ ! -f "$acc_cfg" ]]; then
    echo "error: accelerate config $acc_cfg not found (FP_ACCELERATE=${FP_ACCELERATE:-}); choose one of: $(ls configs/accelerate | sed 's/\.yaml$//' | tr '\n' ' ')" >&2
    exit 2
  fi
  if [[ "$acc_cfg" == *cpu* ]]; then export ACCELERATE_USE_CPU=1; fi
  # DeepSpeed configs run on CPU as they are (DeepSpeed picks its CPU accelerator when no GPU is found);
  # ACCELERATE_USE_CPU=1 would silently turn them into plain DDP, so it is dropped for them.
  if [[ "$acc_cfg" == *deepspeed* ]]; then unset ACCELERATE_USE_CPU; fi
  # FP_ACCELERATE_ARGS: extra `accelerate launch` flags (word-split), e.g. the per-node --machine_rank
  # shellcheck disable=SC2086
  exec accelerate launch --config_file "$acc_cfg" ${FP_ACCELERATE_ARGS:-} "train/$1.py" "${@:2}"
}
case "$job" in
  teacher|distill|prune|interpolator|decoder)
    if [[ ! -f "train/$job.py" ]]; then echo "error: train/$job.py is not implemented yet (see the open issues)" >&2; exit 2; fi
    train_job "$job" "$@" ;;
  bench)
    if [[ ! -f infer/benchmark.py ]]; then echo "error: the benchmark is not implemented yet (see the open issues)" >&2; exit 2; fi
    exec python -m infer.benchmark "$@" ;;
  quickstart)
    if [[ ! -f scripts/quickstart.sh ]]; then echo "error: the quickstart is not implemented yet (see the open issues)" >&2; exit 2; fi
    exec bash scripts/quickstart.sh "$@" ;;
  test)
    # default: everything but tests marked slow (CI runs this); pass pytest args to choose, e.g. `-m slow` or `tests/unit`
    if [[ $# -eq 0 ]]; then exec python -m pytest -q -m "not slow"; fi
    exec python -m pytest -q "$@" ;;
  *) echo "error: unknown job '$job' (teacher distill prune interpolator decoder bench quickstart test)" >&2; exit 2 ;;
esac
