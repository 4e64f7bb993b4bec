#!/usr/bin/env bash
# the main row: prune the 4-step LCM student to >= 40 % fewer UNet MACs, KD-recover against the unpruned student, evaluate
export OMP_NUM_THREADS=1 PYTHONPATH=.
S=runs/distill/tiny_4step/model
while [ ! -f runs/distill/tiny_4step/DONE ] || [ ! -f $S/fastportrait.json ]; do sleep 15; done
/usr/bin/time -f "%e s wall" python train/prune.py --config configs/prune/tiny_4step.yaml train.max_steps=150 train.batch_size=2 num_frames=4 \
   taylor_clips=8 eval_clips=0 count_repeats=5 train.threads=1
OUT=runs/eval/prune_student ROW="lcm4:steps=4,guidance=3.5,sampler=lcm" bash runs/prune/sweep/eval.sh unpruned=$S pruned42=runs/prune/tiny_4step/model
echo STUDENT DONE
