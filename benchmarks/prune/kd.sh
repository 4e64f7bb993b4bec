#!/usr/bin/env bash
# KD vs no-KD at the same budget (40 % MACs, Taylor, 60 steps x batch 2 x 4 frames) on the tiny teacher
export OMP_NUM_THREADS=1 PYTHONPATH=.
M=${M:-runs/teacher/tiny_v0/model}
R=${R:-runs/prune/v0}
for kd in true false; do
  /usr/bin/time -f "%e s wall" python train/prune.py --config configs/prune/tiny.yaml model=$M kd=$kd train.run_dir=$R/kd_$kd export_dir=$R/kd_$kd/model \
     train.max_steps=60 train.batch_size=2 num_frames=4 taylor_clips=8 taylor_steps=4 eval_clips=0 count_repeats=5 train.threads=1 train.checkpoint_every=30
done
