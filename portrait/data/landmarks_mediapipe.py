"""MediaPipe Face Mesh -> 68-point iBUG landmarks, run in mediapipe's own environment.

mediapipe 0.10.x needs protobuf<5, which conflicts with wandb, so ``portrait.data.videos`` calls
this module in a subprocess with a separate interpreter (``--mediapipe-python``). It therefore
imports nothing but numpy at module level (mediapipe lazily), and nothing from the rest of
``portrait`` (keep ``portrait/__init__.py`` and ``portrait/data/__init__.py`` import-free).

Input: ``--frames in.npy`` of shape ``(T, H, W, 3)`` uint8 RGB. Output: ``--out out.npy`` of shape
``(T, 68, 2)`` float32 ``(x, y)`` normalised to ``[0, 1]`` of the frame width/height (multiply by the
size to get pixels), NaN rows for frames with no face. Exit codes: 0 ok, 2 bad input, 3 no mediapipe.

Setup of the separate environment (once)::

    python -m venv ~/.venvs/mediapipe && ~/.venvs/mediapipe/bin/pip install mediapipe==0.10.14 numpy
    export FASTPORTRAIT_MEDIAPIPE_PYTHON=~/.venvs/mediapipe/bin/python
    $FASTPORTRAIT_MEDIAPIPE_PYTHON -m portrait.data.landmarks_mediapipe --check   # from the repo root
"""

from __future__ import annotations

import argparse
import importlib.util
import sys

import numpy as np

# MediaPipe Face Mesh (468 points, canonical face model topology) index for each iBUG-68 point.
# Chosen from the mesh's named contours (face oval, eyebrows, eyes, lips, nose) so that each iBUG
# point gets the mesh vertex at the same anatomical spot, symmetric left/right:
#   jaw 0-16     face-oval vertices from the image-left ear level (234) round the chin (152) to 454,
#                every other vertex near the chin so the 17 points are roughly evenly spaced;
#   brows 17-26  upper eyebrow contour, 70..107 (right) and 336..300 (left);
#   nose 27-30   bridge 168 (between the eyes) -> 197 -> 5 -> 1 (tip); 31-35 base 98, 97, 2, 326, 327;
#   eyes 36-47   the six points of the usual eye-aspect-ratio sets (33,160,158,133,153,144 and
#                362,385,387,263,373,380);
#   lips 48-67   outer contour 61..291 via 0 (upper centre) and 17 (lower centre), inner contour
#                78..308 via 13 and 14.
MEDIAPIPE_TO_IBUG68: tuple[int, ...] = (
    # jaw 0-16
    234, 93, 132, 58, 172, 136, 150, 176, 152, 400, 379, 365, 397, 288, 361, 323, 454,
    # right brow 17-21 (outer -> inner), left brow 22-26 (inner -> outer)
    70, 63, 105, 66, 107, 336, 296, 334, 293, 300,
    # nose bridge 27-30, nose base 31-35
    168, 197, 5, 1, 98, 97, 2, 326, 327,
    # right eye 36-41, left eye 42-47
    33, 160, 158, 133, 153, 144, 362, 385, 387, 263, 373, 380,
    # outer lips 48-59
    61, 40, 37, 0, 267, 270, 291, 321, 405, 17, 181, 91,
    # inner lips 60-67
    78, 81, 13, 311, 308, 402, 14, 178,
)
assert len(MEDIAPIPE_TO_IBUG68) == 68 and len(set(MEDIAPIPE_TO_IBUG68)) == 68


def mediapipe_available() -> bool:
    """True if ``import mediapipe`` would succeed in this interpreter."""
    return importlib.util.find_spec("mediapipe") is not None


def mesh_to_ibug68(mesh: np.ndarray) -> np.ndarray:
    """``(..., 468 or 478, 2)`` mesh points -> ``(..., 68, 2)`` iBUG points."""
    mesh = np.asarray(mesh)
    if mesh.shape[-2] < 468:
        raise ValueError(f"expected >= 468 face-mesh points, got {mesh.shape}")
    return mesh[..., list(MEDIAPIPE_TO_IBUG68), :]


def detect(frames: np.ndarray, min_detection_confidence: float = 0.5, static: bool = False) -> np.ndarray:
    """Run Face Mesh on a frame sequence.

    Args:
        frames: ``(T, H, W, 3)`` uint8 RGB, consecutive frames of one video (tracking is used between
            frames unless ``static``).
        min_detection_confidence: face detector threshold.
        static: treat frames as unrelated images (detect on every frame).
    Returns:
        ``(T, 68, 2)`` float32, ``(x, y)`` in ``[0, 1]`` of width/height; NaN for frames without a face.
    """
    try:
        import mediapipe as mp
    except ImportError as e:
        raise ImportError(
            f"mediapipe is not importable in {sys.executable}: {e}. Install mediapipe==0.10.14 in a separate "
            "environment and point --mediapipe-python / FASTPORTRAIT_MEDIAPIPE_PYTHON at its python.") from e
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be (T, H, W, 3) uint8, got {frames.shape} {frames.dtype}")
    out = np.full((len(frames), 68, 2), np.nan, np.float32)
    with mp.solutions.face_mesh.FaceMesh(static_image_mode=static, max_num_faces=1, refine_landmarks=False,
                                         min_detection_confidence=min_detection_confidence,
                                         min_tracking_confidence=0.5) as mesh:
        for t, frame in enumerate(frames):
            res = mesh.process(np.ascontiguousarray(frame))
            if res.multi_face_landmarks:
                pts = np.array([(p.x, p.y) for p in res.multi_face_landmarks[0].landmark], np.float32)
                out[t] = mesh_to_ibug68(pts)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m portrait.data.landmarks_mediapipe", description=__doc__.split("\n")[0])
    parser.add_argument("--frames", help="input .npy (T, H, W, 3) uint8")
    parser.add_argument("--out", help="output .npy (T, 68, 2) float32, normalised, NaN = no face")
    parser.add_argument("--min-confidence", type=float, default=0.5)
    parser.add_argument("--static", action="store_true", help="detect on every frame (no tracking)")
    parser.add_argument("--check", action="store_true", help="only check that mediapipe imports")
    args = parser.parse_args(argv)
    if args.check:
        if not mediapipe_available():
            print(f"error: mediapipe is not installed in {sys.executable}", file=sys.stderr)
            return 3
        import mediapipe as mp
        print(f"mediapipe {getattr(mp, '__version__', '?')} in {sys.executable}")
        return 0
    if not args.frames or not args.out:
        parser.error("--frames and --out are required (or --check)")
    try:
        frames = np.load(args.frames)
    except Exception as e:
        print(f"error: cannot read {args.frames}: {e}", file=sys.stderr)
        return 2
    try:
        lmk = detect(frames, args.min_confidence, args.static)
    except ImportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    np.save(args.out, lmk)
    return 0


if __name__ == "__main__":
    sys.exit(main())
