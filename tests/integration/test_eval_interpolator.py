"""infer.eval_interpolator end to end at a minimal size: the issue-6 table, the oracle section and the bars."""

from __future__ import annotations

import json

import torch

from infer.eval_interpolator import main
from portrait.models.interpolator import build_interpolator


def test_eval_interpolator_writes_every_section(tmp_path, train_dataset, tiny_model_dir):
    blendlike = build_interpolator("tiny")  # untrained: zero-initialised heads, exactly the linear blend
    blendlike.save_pretrained(tmp_path / "interp0")
    out = tmp_path / "eval.json"
    rc = main(["--model", str(tiny_model_dir), "--interpolator", str(tmp_path / "interp0"), "--data", str(train_dataset),
               "--clips", "1", "--frames", "8", "--gaps", "2", "3", "--steps", "1", "--cache", str(tmp_path / "cache"),
               "--out", str(out)])
    assert rc == 0
    r = json.loads(out.read_text())
    assert set(r["gaps"]) == {"fixed:2", "fixed:3"} and "adaptive" in r["adaptive"]
    assert set(r["oracle"]) == {"fixed:2", "fixed:3"}
    for section in (r["gaps"]["fixed:3"], r["oracle"]["fixed:3"]):
        # an untrained interpolator is the blend, with landmarks on or off
        for row in ("interp_off", "interp_on"):
            for metric in ("psnr_teacher", "psnr_gt", "mouth_psnr"):
                assert abs(section[row][metric] - section["blend"][metric]) < 1e-3, (row, metric)
    # the oracle keyframes are the VAE round trip of the ground truth, not the teacher's frames
    assert r["oracle"]["fixed:3"]["blend"]["psnr_teacher"] != r["gaps"]["fixed:3"]["blend"]["psnr_teacher"]
    assert r["bars"]["oracle_on_vs_blend_psnr_db"]["met"] is None
    assert abs(r["bars"]["on_vs_blend_psnr_teacher_db"]["value"]) < 1e-3
    md = out.with_suffix(".md").read_text()
    assert "Oracle keyframes" in md and "| claim |" in md

    # a trained-looking interpolator (non-zero heads) differs from the blend: the rows really run the network
    moved = build_interpolator("tiny")
    with torch.no_grad():
        for block in moved.blocks:
            block.head.weight.normal_(0, 0.05)
    moved.save_pretrained(tmp_path / "interp1")
    rc = main(["--model", str(tiny_model_dir), "--interpolator", str(tmp_path / "interp1"), "--data", str(train_dataset),
               "--clips", "1", "--frames", "8", "--gaps", "3", "--steps", "1", "--cache", str(tmp_path / "cache"),
               "--out", str(tmp_path / "eval1.json")])
    assert rc == 0
    r1 = json.loads((tmp_path / "eval1.json").read_text())
    assert abs(r1["oracle"]["fixed:3"]["interp_off"]["psnr_teacher"] - r1["oracle"]["fixed:3"]["blend"]["psnr_teacher"]) > 1e-3
