#!/usr/bin/env bash
# evaluate the unpruned source and the pruned folders: 8 held-out clips x 16 frames, 4-step DDIM with CFG 3.5, same noise
export OMP_NUM_THREADS=1 PYTHONPATH=.
OUT=${OUT:-runs/eval/prune_v0}
ROW=${ROW:-ddim4:steps=4,guidance=3.5,sampler=ddim}
mkdir -p $OUT
for spec in "$@"; do
  name=${spec%%=*}; dir=${spec#*=}
  for proto in self cross; do
    [ -f $OUT/${name}_${proto}.json ] || python -m infer.evaluate --model $dir --data runs/data/synthetic64 --split test --clips 8 --frames 16 \
        --row "$ROW" --protocol $proto --out $OUT/${name}_${proto}.json 2>&1 | grep -v "it/s\|Warn\|warn" | tail -3
  done
done
