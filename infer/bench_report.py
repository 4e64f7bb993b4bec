"""Report side of the benchmark: the picker, ``report.md``, ``pareto.png``, the side-by-side video, README section.

All functions take the report dict that ``infer.benchmark`` writes as ``report.json`` (``{"variants": [...], ...}``),
so they can be re-run on a saved report. Every file is written atomically (temporary sibling, then rename).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np

README_BEGIN = "<!-- results:begin -->"
README_END = "<!-- results:end -->"

# (key, header, format) of the report.md table
COLUMNS = [
    ("sec_per_frame", "s/frame", "{:.4g}"),
    ("spread", "spread (min-max)", None),
    ("fps", "fps", "{:.3g}"),
    ("speedup_vs_shipped", "x shipped", "{:.2f}"),
    ("speedup_vs_fixed", "x fixed", "{:.2f}"),
    ("unet_evals_per_frame", "UNet evals/frame", "{:.3g}"),
    ("gflops_per_frame", "GFLOP/frame", "{:.3g}"),
    ("dominant", "dominant component", None),
    ("peak_mem_mb", "peak MiB", "{:.0f}"),
    ("psnr_gt", "PSNR gt", "{:.2f}"),
    ("ssim_gt", "SSIM gt", "{:.3f}"),
    ("psnr_teacher", "PSNR vs teacher", "{:.2f}"),
    ("landmark_error", "landmark NME", "{:.4f}"),
    ("mouth_psnr", "mouth PSNR", "{:.2f}"),
    ("flicker", "flicker", "{:.2f}"),
]


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", dir=p.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return p


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode())


def ok_rows(report: dict) -> list[dict]:
    return [v for v in report["variants"] if v.get("status") == "ok"]


# -- the picker ------------------------------------------------------------------------------------------
def within_budget(row: dict, ref: dict, budget: dict) -> tuple[bool, str]:
    """Does ``row`` meet ``budget`` relative to the reference (teacher) row? -> (ok, reason if not).

    budget keys (None/absent = no limit):
      max_psnr_loss_db: psnr_gt(ref) - psnr_gt(row) <= this;
      max_landmark_ratio: landmark_error(row) / landmark_error(ref) <= this;
      min_psnr_teacher_db: psnr_teacher(row) >= this.
    """
    def need(key):
        v = row.get(key)
        if v is None or (isinstance(v, float) and math.isnan(v)):
            raise ValueError(f"the budget needs '{key}', which variant {row.get('name')!r} does not report")
        return v

    lim = budget.get("max_psnr_loss_db")
    if lim is not None:
        loss = ref["psnr_gt"] - need("psnr_gt")
        if loss > lim:
            return False, f"PSNR loss {loss:.2f} dB > {lim:g} dB"
    lim = budget.get("max_landmark_ratio")
    if lim is not None:
        ratio = need("landmark_error") / max(ref["landmark_error"], 1e-12)
        if ratio > lim:
            return False, f"landmark error {ratio:.2f}x the teacher's > {lim:g}x"
    lim = budget.get("min_psnr_teacher_db")
    if lim is not None and need("psnr_teacher") < lim:
        return False, f"PSNR vs teacher {row['psnr_teacher']:.2f} dB < {lim:g} dB"
    return True, ""


def pick(report: dict, budget: dict, reference: str) -> dict:
    """The fastest ``ok`` variant (largest ``speedup_vs_shipped``) within ``budget`` of the ``reference`` row.

    Returns ``{"name", "speedup_vs_shipped", "reference", "budget", "rejected": {name: reason}}``; ``name`` is
    None when nothing qualifies. Raises ValueError when the reference row is absent or did not run.
    """
    rows = ok_rows(report)
    ref = next((r for r in rows if r["name"] == reference), None)
    if ref is None:
        raise ValueError(f"budget reference variant {reference!r} is not among the variants that ran "
                         f"({[r['name'] for r in rows]})")
    best, rejected = None, {}
    for r in rows:
        ok, why = within_budget(r, ref, budget)
        if not ok:
            rejected[r["name"]] = why
        elif best is None or r["speedup_vs_shipped"] > best["speedup_vs_shipped"]:
            best = r
    return {"name": best["name"] if best else None, "speedup_vs_shipped": best["speedup_vs_shipped"] if best else None,
            "reference": reference, "budget": dict(budget), "rejected": rejected}


def pareto_front(points: list[tuple[float, float]], maximise_y: bool = True) -> list[int]:
    """Indices of the points not dominated when maximising x and maximising (or minimising) y."""
    front = []
    for i, (x, y) in enumerate(points):
        dominated = False
        for j, (x2, y2) in enumerate(points):
            if j == i:
                continue
            better_y = y2 >= y if maximise_y else y2 <= y
            strictly = x2 > x or (y2 > y if maximise_y else y2 < y)
            if x2 >= x and better_y and strictly:
                dominated = True
                break
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


# -- report.md -------------------------------------------------------------------------------------------
def _cell(row: dict, key: str, fmt: str | None) -> str:
    if key == "spread":
        lo, hi = row.get("sec_per_frame_min"), row.get("sec_per_frame_max")
        return "" if lo is None else f"{lo:.3g}-{hi:.3g}"
    if key == "gflops_per_frame":
        f = (row.get("flops_per_frame") or {}).get("total")
        return "" if f is None else f"{f / 1e9:.3g}"
    if key == "dominant":
        f = {k: v for k, v in (row.get("flops_per_frame") or {}).items() if k != "total"}
        if not f or not sum(f.values()):
            return ""
        k = max(f, key=f.get)
        return f"{k} {100 * f[k] / sum(f.values()):.0f}%"
    v = row.get(key)
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    return fmt.format(v) if fmt else str(v)


def variant_desc(row: dict) -> str:
    v = row.get("config", {})
    parts = [f"{v.get('steps_resolved', v.get('steps'))} steps", f"w {v.get('guidance')}", v.get("sampler_resolved") or "",
             v.get("dtype", ""), "legacy loop" if v.get("legacy_loop") else "fixed loop"]
    if v.get("quantize", "none") != "none":
        parts.append(v["quantize"])
    if v.get("compile"):
        parts.append("compiled")
    if v.get("keyframes", "none") != "none":
        parts.append(f"keyframes {v['keyframes']}")
    if v.get("decoder"):
        parts.append(f"tiny decoder {Path(v['decoder']).name}")
    return ", ".join(p for p in parts if p)


def to_markdown(report: dict) -> str:
    speed_only = report.get("mode") == "speed"
    cols = [c for c in COLUMNS if not (speed_only and c[0] in QUALITY_KEYS)]
    lines = [f"# Benchmark `{report['name']}`", "", report.get("summary", ""), ""]
    lines += ["| variant | " + " | ".join(h for _, h, _ in cols) + " |", "|---|" + "---|" * len(cols)]
    for r in report["variants"]:
        if r.get("status") == "ok":
            lines.append(f"| {r['name']} | " + " | ".join(_cell(r, k, f) for k, _, f in cols) + " |")
    lines.append("")
    lines.append("| variant | what | status | load s | warm-up s |")
    lines.append("|---|---|---|---|---|")
    for r in report["variants"]:
        load = f"{r['load_sec']:.2f}" if r.get("load_sec") is not None else ""
        warm = f"{r['warmup_sec']:.2f}" if r.get("warmup_sec") is not None else ""
        lines.append(f"| {r['name']} | {r.get('model', '')}: {variant_desc(r)} | {r.get('status')} | {load} | {warm} |")
    kf = [r for r in ok_rows(report) if r.get("by_frame_type")]
    if kf:
        lines += ["", "Keyframes vs in-between frames:", "", "| variant | frames | PSNR gt | PSNR vs teacher | landmark NME | mouth PSNR | flicker |",
                  "|---|---|---|---|---|---|---|"]
        for r in kf:
            for kind, m in r["by_frame_type"].items():
                lines.append(f"| {r['name']} | {kind} | " + " | ".join(
                    _cell(m, k, f) for k, f in (("psnr_gt", "{:.2f}"), ("psnr_teacher", "{:.2f}"), ("landmark_error", "{:.4f}"),
                                                ("mouth_psnr", "{:.2f}"), ("flicker", "{:.2f}"))) + " |")
    best = ok_rows(report)
    if best and any(r.get("flops_per_frame") for r in best):
        lines += ["", "FLOPs per output frame by component (GFLOP):", "",
                  "| variant | " + " | ".join(COMPONENT_HEADERS) + " | total |", "|---|" + "---|" * (len(COMPONENT_HEADERS) + 1)]
        for r in best:
            f = r.get("flops_per_frame") or {}
            lines.append(f"| {r['name']} | " + " | ".join(f"{f.get(k, 0) / 1e9:.3g}" for k in COMPONENT_HEADERS) + f" | {f.get('total', 0) / 1e9:.3g} |")
    if report.get("pick"):
        p = report["pick"]
        lines += ["", f"**Pick** (budget {json.dumps(p['budget'])} vs `{p['reference']}`): "
                  + (f"`{p['name']}`, {p['speedup_vs_shipped']:.2f}x faster than the teacher as shipped." if p["name"] else "no variant is within budget.")]
        if p.get("dominant_component"):
            d = p["dominant_component"]
            lines.append(f"Its counted FLOPs are dominated by **{d['name']}** ({100 * d['share']:.0f}% per frame): the next speed work goes there.")
        for n, why in p.get("rejected", {}).items():
            lines.append(f"- `{n}` rejected: {why}")
    if report.get("notes"):
        lines += [""] + [f"- {n}" for n in report["notes"]]
    return "\n".join(lines).rstrip() + "\n"


QUALITY_KEYS = {"psnr_gt", "ssim_gt", "psnr_teacher", "landmark_error", "mouth_psnr", "flicker"}
COMPONENT_HEADERS = ["reference_unet", "pose_guider", "denoising_unet", "vae_decode", "interpolator", "other"]


# -- pareto.png ------------------------------------------------------------------------------------------
def plot_pareto(report: dict, path: str | Path) -> Path | None:
    """Speed-up vs the shipped teacher (log x) against PSNR vs ground truth and landmark error; front marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    rows = [r for r in ok_rows(report) if r.get("psnr_gt") is not None]
    if not rows:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax, key, maximise, label in ((axes[0], "psnr_gt", True, "PSNR vs ground truth (dB, higher is better)"),
                                     (axes[1], "landmark_error", False, "landmark error NME (lower is better)")):
        pts = [(r["speedup_vs_shipped"], r[key]) for r in rows if r.get(key) is not None]
        names = [r["name"] for r in rows if r.get(key) is not None]
        if not pts:
            continue
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], color="tab:blue", zorder=3)
        front = pareto_front(pts, maximise_y=maximise)
        ax.step([pts[i][0] for i in front], [pts[i][1] for i in front], where="post", color="tab:red", lw=1.5,
                label="Pareto front", zorder=2)
        ax.scatter([pts[i][0] for i in front], [pts[i][1] for i in front], facecolors="none", edgecolors="tab:red", s=120, zorder=4)
        for (x, y), n in zip(pts, names):
            ax.annotate(n, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x:g}x"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("speed-up vs teacher as shipped (end to end, x)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(loc="best", fontsize=8)
    fig.suptitle(f"fastportrait benchmark `{report['name']}` ({report.get('machine', '')})", fontsize=9)
    fig.tight_layout()
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


# -- side-by-side video ------------------------------------------------------------------------------------
def label_strip(width: int, text: str, height: int = 14) -> np.ndarray:
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (width, height), (0, 0, 0))
    ImageDraw.Draw(im).text((2, 1), text[: max(1, width // 6)], fill=(255, 255, 255))
    return np.asarray(im)


def side_by_side(columns: list[tuple[str, np.ndarray]], scale: int = 3) -> np.ndarray:
    """[(label, uint8 (F, H, W, 3))] -> uint8 (F, 14 + H*scale, sum(W*scale), 3), each column labelled."""
    out = []
    for label, video in columns:
        v = video.repeat(scale, axis=1).repeat(scale, axis=2)
        head = np.broadcast_to(label_strip(v.shape[2], label)[None], (v.shape[0], 14, v.shape[2], 3))
        out.append(np.concatenate([head, v], axis=1))
    return np.ascontiguousarray(np.concatenate(out, axis=2))


def write_side_by_side(out_dir: Path, columns: list[tuple[str, np.ndarray]], fps: float) -> list[Path]:
    from infer.io import write_gif, write_video

    frames = side_by_side(columns)
    if frames.shape[1] % 2 or frames.shape[2] % 2:  # yuv420p wants even sizes
        frames = np.ascontiguousarray(frames[:, : frames.shape[1] // 2 * 2, : frames.shape[2] // 2 * 2])
    return [write_video(out_dir / "side_by_side.mp4", frames, fps), write_gif(out_dir / "side_by_side.gif", frames, min(fps, 12.0))]


def video_columns(report: dict, limit: int) -> list[str]:
    """The variants shown beside ground truth and the teacher: the pick, then the fastest Pareto-front rows."""
    rows = [r for r in ok_rows(report) if r["name"] not in (report.get("shipped"), report.get("fixed"))]
    chosen = []
    if report.get("pick") and report["pick"].get("name") and report["pick"]["name"] not in (report.get("shipped"), report.get("fixed")):
        chosen.append(report["pick"]["name"])
    pts = [(r["speedup_vs_shipped"], r.get("psnr_gt") or 0.0) for r in rows]
    for i in reversed(pareto_front(pts)) if pts else []:
        if rows[i]["name"] not in chosen:
            chosen.append(rows[i]["name"])
    return chosen[:limit]


# -- README section ------------------------------------------------------------------------------------------
def readme_section(report_md: Path, readme: Path, plot_dir: Path | None = None) -> str:
    """Replace the text between ``README_BEGIN``/``README_END`` in ``readme`` with a section generated from
    ``report_md`` (headings demoted by two levels) and a link to the plot beside it (copied into ``plot_dir``,
    default ``docs/results/``, so the README does not point into the git-ignored ``runs/``). Returns the section."""
    report_md, readme = Path(report_md), Path(readme)
    if not report_md.is_file():
        raise FileNotFoundError(f"report not found: {report_md} (run `python -m infer.benchmark --config ...` first)")
    if not readme.is_file():
        raise FileNotFoundError(f"README not found: {readme}")
    text = readme.read_text()
    if README_BEGIN not in text or README_END not in text or text.index(README_BEGIN) > text.index(README_END):
        raise ValueError(f"{readme} has no '{README_BEGIN}' ... '{README_END}' markers; add them where the Results section goes")
    body = re.sub(r"^(#+) ", lambda m: "#" * min(6, len(m.group(1)) + 2) + " ", report_md.read_text(), flags=re.M)
    lines = [README_BEGIN, "<!-- generated by `python -m infer.benchmark --readme " + str(report_md) + "`; do not edit by hand -->", "", body.strip(), ""]
    plot = report_md.parent / "pareto.png"
    if plot.is_file():
        plot_dir = Path(plot_dir) if plot_dir else readme.parent / "docs" / "results"
        plot_dir.mkdir(parents=True, exist_ok=True)
        dst = plot_dir / f"{report_md.parent.name}_pareto.png"
        shutil.copyfile(plot, dst)
        lines += [f"![speed-up vs quality]({os.path.relpath(dst, readme.parent)})", ""]
    lines.append(README_END)
    section = "\n".join(lines)
    start, end = text.index(README_BEGIN), text.index(README_END) + len(README_END)
    atomic_write_text(readme, text[:start] + section + text[end:])
    return section
