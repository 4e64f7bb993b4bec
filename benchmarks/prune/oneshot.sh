#!/usr/bin/env bash
# one-shot ratio sweep on the tiny teacher (magnitude vs Taylor at ~20/40/60 % MACs), then evaluation
set -x
M=${M:-runs/teacher/tiny_v0/model}
O=${O:-runs/prune/sweep/v0}
export OMP_NUM_THREADS=1 PYTHONPATH=.
for imp in magnitude taylor; do for r in 0.2 0.4 0.6; do
  [ -f $O/${imp}_${r}/fastportrait.json ] || python -m prune.oneshot --model $M --out $O/${imp}_${r} --importance $imp --target-mac-reduction $r --taylor-steps 4
done; done
