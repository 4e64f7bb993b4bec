"""Write a freshly initialised model folder from a model config.

    python -m portrait.models.build --config configs/model/tiny.yaml --out runs/models/tiny-init [--seed 0]
    python -m portrait.models.build --config configs/model/aniportrait.yaml --out runs/models/full-random  # ~2.5 GB

Tests and benchmarks use it: timing does not depend on trained weights.
"""

from __future__ import annotations

import argparse
import sys
import time

from portrait import config as config_lib
from portrait.models.bundle import ModelConfig, Pose2VideoModel, count_parameters


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=None, help="model YAML (default: the embedded tiny model)")
    ap.add_argument("--out", required=True, help="model folder to write (replaced atomically if it exists)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("overrides", nargs="*", help="key=value overrides of the model config")
    args = ap.parse_args(argv)
    try:
        cfg = config_lib.load(ModelConfig, args.config, args.overrides)
        t0 = time.time()
        model = Pose2VideoModel.from_config(cfg, seed=args.seed)
    except (config_lib.ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    model.save_pretrained(args.out, metadata={"title": f"freshly initialised `{cfg.name}` (seed {args.seed})", "seed": args.seed, "trained": False})
    print(f"wrote {args.out}: {count_parameters(model) / 1e6:.2f} M parameters in {time.time() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
