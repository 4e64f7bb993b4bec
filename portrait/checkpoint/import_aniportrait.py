"""Convert AniPortrait's released weights into a fastportrait model folder.

    python -m portrait.checkpoint.import_aniportrait --src AniPortrait/pretrained_model --out models/aniportrait
    python -m portrait.checkpoint.import_aniportrait --src AniPortrait/pretrained_model --out models/aniportrait-fp16 \
        --dtype fp16 --force

``--src`` is AniPortrait's ``pretrained_model/`` folder (``denoising_unet.pth``, ``reference_unet.pth``,
``pose_guider.pth``, ``motion_module.pth``, ``stable-diffusion-v1-5/``, ``sd-vae-ft-mse/``,
``image_encoder/``). Every tensor is loaded strictly (see :mod:`portrait.checkpoint.aniportrait`); the
folder is written atomically with ``Pose2VideoModel.save_pretrained``, so on any failure nothing is left
at ``--out``. An existing non-empty ``--out`` is replaced only with ``--force`` (and only once the new
folder is complete). Exit status: 0 ok, 1 import error (message on stderr), 2 usage error.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from portrait.checkpoint.aniportrait import (
    DTYPES,
    AniPortraitLayoutError,
    CheckpointMismatchError,
    CheckpointReadError,
    import_aniportrait,
    model_card,
)

log = logging.getLogger("portrait.checkpoint.import_aniportrait")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m portrait.checkpoint.import_aniportrait",
        description="Import AniPortrait's pretrained_model/ folder into a fastportrait Pose2Video model folder.",
    )
    p.add_argument("--src", required=True, type=Path, help="AniPortrait pretrained_model/ folder")
    p.add_argument("--out", required=True, type=Path, help="model folder to write")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="storage dtype of the weights (default fp32)")
    p.add_argument("--force", action="store_true", help="replace an existing non-empty --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar, warnings only")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> Path:
    """Import ``args.src`` and write ``args.out``; raises the importer's errors (see :func:`main`)."""
    out: Path = args.out
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} exists and is not a folder; remove it or choose another --out")
    if out.is_dir() and any(out.iterdir()) and not args.force:
        raise FileExistsError(f"--out {out} exists and is not empty; pass --force to replace it")
    t0 = time.perf_counter()
    model = import_aniportrait(args.src, DTYPES[args.dtype], progress=not args.quiet)
    log.info("writing %s", out)
    # save_pretrained writes a temporary sibling folder and renames it into place (replacing an existing
    # --out only after the new folder is complete), so a failure here leaves --out untouched.
    model.save_pretrained(out, model_card=model_card(model.metadata, model.pose_guider.config))
    log.info("imported AniPortrait from %s into %s in %.1f s", args.src, out, time.perf_counter() - t0)
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        run(args)
    except FileExistsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (AniPortraitLayoutError, CheckpointMismatchError, CheckpointReadError) as e:
        print(f"error: {e}", file=sys.stderr)
        print(f"nothing was written: {args.out} is unchanged", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
