"""Publish a model folder (teacher, student, pruned) to the Hugging Face Hub.

    python -m portrait.checkpoint.publish MODEL_DIR --repo-id NAME [--private] [--message TEXT]

Order of checks, all before any network call: MODEL_DIR must be a complete fastportrait model folder, then a
token must be available (``HF_TOKEN``, else the one ``hf auth login`` stored; ``huggingface_hub.get_token``).
Exit status: 0 published, 1 the upload failed, 2 bad folder or no token (nothing was done).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from portrait.models.bundle import COMPONENTS, ModelFolderError, read_model_info

LOGIN_HELP = ("no Hugging Face token found: run `hf auth login` (or `huggingface-cli login`), or set HF_TOKEN=<a write token "
              "from https://huggingface.co/settings/tokens>; nothing was uploaded")


def check_model_folder(path: Path) -> dict:
    """Raise ``ModelFolderError`` unless ``path`` is a complete model folder; return its fastportrait.json."""
    info = read_model_info(path)
    missing = [c for c in COMPONENTS if not (path / c).is_dir()]
    if missing:
        raise ModelFolderError(f"model folder {path} is missing {missing}; re-export it before publishing")
    if not (path / "README.md").is_file():
        raise ModelFolderError(f"model folder {path} has no README.md model card; re-export it before publishing")
    return info


def find_token() -> str | None:
    from huggingface_hub import get_token

    return get_token() or None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m portrait.checkpoint.publish", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir", type=Path, help="an exported model folder")
    ap.add_argument("--repo-id", required=True, help="Hub repository, e.g. user/fastportrait-4step")
    ap.add_argument("--private", action="store_true", help="create the repository as private")
    ap.add_argument("--message", default=None, help="commit message (default: the model's title)")
    args = ap.parse_args(argv)
    try:
        info = check_model_folder(args.model_dir)
    except ModelFolderError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    token = find_token()
    if not token:
        print(f"error: {LOGIN_HELP}", file=sys.stderr)
        return 2
    try:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
        url = api.create_repo(args.repo_id, private=args.private, exist_ok=True, repo_type="model")
        title = info.get("metadata", {}).get("title", args.model_dir.name)
        api.upload_folder(folder_path=str(args.model_dir), repo_id=args.repo_id, repo_type="model",
                          commit_message=args.message or f"Upload {title}")
    except Exception as e:  # network, permissions, offline mode: one clear line
        print(f"error: publishing {args.model_dir} to {args.repo_id} failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
              file=sys.stderr)
        return 1
    print(f"published {args.model_dir} to {url}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
