"""Step and guidance distillation of the Pose2Video teacher (see train/distill.py).

* :mod:`distill.schedules` -- the solver grid, student timestep grids, x0/eps conversions, boundary scalings.
* :mod:`distill.models` -- student/teacher/target construction, the teacher's guided prediction.
* :mod:`distill.objectives` -- consistency (LCM / phased) and guidance distillation losses.
"""
