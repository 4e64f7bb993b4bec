#!/usr/bin/env bash
# The quickstart: synthetic data -> tiny teacher -> short distillation -> pruning -> interpolator -> tiny VAE decoder
# -> benchmark.
#   bash launch.sh quickstart            # (= bash scripts/quickstart.sh) on the embedded default, CPU
#   QS_THREADS=2 bash launch.sh quickstart
# Resumable: every stage is skipped when its output exists, and the train scripts resume an interrupted stage from
# their last checkpoint, so re-running the same command continues where it stopped. Budget: <= 20 min on 2 cores.
# A stage whose train script does not exist yet is skipped with a message (its benchmark rows then read "skipped").
#
# Environment knobs (defaults in brackets):
#   QS_RUN [runs/quickstart]   where the quickstart's models go
#   QS_TEACHER                 an existing teacher model folder to use instead of training one
#                              [runs/teacher/tiny/model if it exists, else the shipped portrait/assets/tiny_teacher,
#                               else a short teacher is trained]
#   QS_INTERP                  an interpolator folder to use [the shipped portrait/assets/tiny_fast_interpolator, else a
#                              short one is trained]
#   QS_DECODER                 a tiny VAE decoder folder to use [the shipped portrait/assets/tiny_decoder when it was
#                              distilled from this teacher's VAE, else a short one is distilled]
#   QS_THREADS [all cores]     torch threads per job
#   QS_DRY_RUN [0]             1: print the stage commands without running them
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export WANDB_MODE="${WANDB_MODE:-offline}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
RUN="${QS_RUN:-runs/quickstart}"
THREADS="${QS_THREADS:-$(python -c 'import os; print(os.cpu_count() or 1)')}"
DATA=runs/data/synthetic64
T0=$(date +%s)
mkdir -p "$RUN"

# QS_DRY_RUN=1 prints the stage commands instead of running them
run() { echo "+ $*"; if [[ "${QS_DRY_RUN:-0}" != 1 ]]; then "$@"; fi; }
stage() { printf '\n=== [%s] %s (%ds elapsed) ===\n' "$1" "$2" "$(( $(date +%s) - T0 ))"; }
done_model() { [[ -f "$1/fastportrait.json" ]]; }
have_script() {
  if [[ -f "train/$1.py" ]]; then return 0; fi
  echo "skipping: train/$1.py does not exist yet (open issue); the benchmark reports its rows as skipped"
  return 1
}

# 1. data ---------------------------------------------------------------------------------------------------
stage 1/7 "synthetic data -> $DATA"
if [[ -d "$DATA" ]]; then echo "reusing $DATA"
else run python -m portrait.data.synthetic --out "$DATA" --clips 2000 --size 64 --seed 0; fi

# 2. teacher ------------------------------------------------------------------------------------------------
TEACHER="${QS_TEACHER:-}"
if [[ -z "$TEACHER" && -f runs/teacher/tiny/model/fastportrait.json ]]; then TEACHER=runs/teacher/tiny/model; fi
if [[ -z "$TEACHER" && -f portrait/assets/tiny_teacher/fastportrait.json ]]; then TEACHER=portrait/assets/tiny_teacher; fi
if [[ -n "$TEACHER" ]]; then
  stage 2/7 "tiny teacher: using $TEACHER"
  done_model "$TEACHER" || { echo "error: QS_TEACHER=$TEACHER is not a model folder" >&2; exit 2; }
else
  TEACHER="$RUN/teacher/model"
  stage 2/7 "tiny teacher: a SHORT run -> $TEACHER (a demo teacher; bash launch.sh teacher trains the real one)"
  if done_model "$TEACHER"; then echo "reusing $TEACHER"
  else
    run python train/teacher.py --config configs/teacher/tiny.yaml export_dir="$TEACHER" train.run_dir="$RUN/teacher" \
      vae.max_steps=600 stage1.max_steps=600 stage2.max_steps=100 train.checkpoint_every=200 train.sample_every=0 \
      train.tracker=none train.threads="$THREADS"
  fi
fi

# 3. step distillation ----------------------------------------------------------------------------------------
STUDENT="$RUN/distill_4step/model"
stage 3/7 "short 4-step LCM distillation -> $STUDENT"
if done_model "$STUDENT"; then echo "reusing $STUDENT"
elif have_script distill; then
  run python train/distill.py --config configs/distill/tiny_4step.yaml teacher="$TEACHER" export_dir="$STUDENT" \
    train.run_dir="$RUN/distill_4step" train.max_steps=100 train.batch_size=2 train.checkpoint_every=50 train.sample_every=0 \
    train.tracker=none train.threads="$THREADS"
fi

# 4. pruning ------------------------------------------------------------------------------------------------
PRUNED="$RUN/prune/model"
stage 4/7 "channel pruning of the student -> $PRUNED"
if done_model "$PRUNED"; then echo "reusing $PRUNED"
elif have_script prune; then
  run python train/prune.py --config configs/prune/tiny_4step.yaml model="$STUDENT" export_dir="$PRUNED" \
    train.run_dir="$RUN/prune" train.max_steps=40 num_frames=4 taylor_clips=8 eval_clips=0 train.sample_every=0 train.tracker=none train.threads="$THREADS"
fi

# 5. interpolator -------------------------------------------------------------------------------------------
INTERP="${QS_INTERP:-}"
if [[ -z "$INTERP" && -f portrait/assets/tiny_fast_interpolator/config.json ]]; then INTERP=portrait/assets/tiny_fast_interpolator; fi
if [[ -n "$INTERP" ]]; then
  stage 5/7 "keyframe interpolator: using $INTERP"
  [[ -f "$INTERP/config.json" ]] || { echo "error: QS_INTERP=$INTERP is not an interpolator folder" >&2; exit 2; }
else
  INTERP="$RUN/interpolator/model"
  stage 5/7 "keyframe interpolator: a SHORT run -> $INTERP (bash launch.sh interpolator trains the real one)"
  if [[ -d "$INTERP" ]]; then echo "reusing $INTERP"
  elif have_script interpolator; then
    run python train/interpolator.py --config configs/interpolator/tiny_fast.yaml vae_model="$TEACHER" export_dir="$INTERP" \
      train.run_dir="$RUN/interpolator" train.max_steps=150 train.checkpoint_every=50 train.tracker=none train.threads="$THREADS"
  fi
fi

# 6. tiny VAE decoder ---------------------------------------------------------------------------------------
# The shipped decoder imitates the shipped teacher's VAE; a retrained teacher has another VAE (the signature
# check in portrait/models/tiny_decoder.py would refuse it), so then a short distillation makes one.
DECODER="${QS_DECODER:-}"
if [[ -z "$DECODER" && -f portrait/assets/tiny_decoder/config.json ]] && [[ "$TEACHER" == portrait/assets/tiny_teacher ]]; then
  DECODER=portrait/assets/tiny_decoder
fi
if [[ -n "$DECODER" ]]; then
  stage 6/7 "tiny VAE decoder: using $DECODER"
  [[ -f "$DECODER/config.json" ]] || { echo "error: QS_DECODER=$DECODER is not a decoder folder" >&2; exit 2; }
else
  DECODER="$RUN/decoder/model"
  stage 6/7 "tiny VAE decoder: a SHORT run -> $DECODER (bash launch.sh decoder trains the real one)"
  if [[ -f "$DECODER/config.json" ]]; then echo "reusing $DECODER"
  elif have_script decoder; then
    run python train/decoder.py --config configs/decoder/tiny.yaml vae_model="$TEACHER" export_dir="$DECODER" \
      train.run_dir="$RUN/decoder" train.max_steps=200 train.checkpoint_every=100 train.tracker=none train.threads="$THREADS"
  fi
fi

# 7. benchmark ----------------------------------------------------------------------------------------------
stage 7/7 "end-to-end benchmark -> runs/bench/quickstart"
run python -m infer.benchmark --config configs/bench/quickstart.yaml teacher="$TEACHER" models="$RUN" interpolator="$INTERP" \
  decoder="$DECODER" threads="$THREADS"
printf '\nquickstart finished in %ds\n' "$(( $(date +%s) - T0 ))"
echo "table:        runs/bench/quickstart/report.md"
echo "plot:         runs/bench/quickstart/pareto.png"
echo "video:        runs/bench/quickstart/side_by_side.mp4 (and .gif)"
