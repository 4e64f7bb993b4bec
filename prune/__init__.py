"""Structured channel pruning of the denoising UNet with torch-pruning, plus KD recovery.

* :mod:`prune.graph`: the dependency graph of our UNet (motion modules, reference bank, pose hooks) and its prunable
  structures (ResNet GroupNorm groups, attention heads, GEGLU widths), checked against the residual streams.
* :mod:`prune.pruner`: magnitude / Taylor importance, global / per-block ratios, MAC-targeted pruning.
* :mod:`prune.kd`: task + output KD + LAPTOP-Diff-normalised feature KD against the unpruned UNet.
* :mod:`prune.count`: MACs / params / wall time per UNet evaluation (``python -m prune.count``).
* :mod:`prune.walltime`: interleaved wall-time comparison of model folders (``python -m prune.walltime``).
* :mod:`prune.oneshot`: prune a folder without recovery (``python -m prune.oneshot``).
* :mod:`prune.export`: the pruned model card. Pruned folders store widths in ``denoising_unet/widths.json``
  (:mod:`portrait.models.widths`).

Entry point with recovery: ``train/prune.py`` (``bash launch.sh prune``).
"""
