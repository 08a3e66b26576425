"""Run reports: a markdown table and PNG plots (mAP per run, loss curves) from run directories."""

from __future__ import annotations

import json
import math
from pathlib import Path


def load_metrics_log(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _fmt(value, digits: int = 1, scale: float = 100.0) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value * scale:.{digits}f}"


def markdown_table(rows: dict[str, dict]) -> str:
    """rows: run name -> summary dict (metrics, params, train_seconds, images_per_s)."""
    lines = ["| run | mAP | AP50 | AP75 | params (M) | train time (s) | train images/s |",
             "|---|---|---|---|---|---|---|"]
    for name, s in rows.items():
        m = s.get("metrics", {})
        lines.append(f"| {name} | {_fmt(m.get('AP'))} | {_fmt(m.get('AP50'))} | {_fmt(m.get('AP75'))} | "
                     f"{s.get('params', 0) / 1e6:.2f} | {s.get('train_seconds', 0):.0f} | {s.get('images_per_s', 0):.1f} |")
    return "\n".join(lines)


def plot_map(rows: dict[str, dict], path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(rows)
    values = [rows[n].get("metrics", {}).get("AP", 0.0) * 100 for n in names]
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(names), 3.6))
    bars = ax.bar(range(len(names)), values, color="#4c72b0")
    ax.bar_label(bars, fmt="%.1f")
    ax.set_xticks(range(len(names)), names, rotation=20, ha="right")
    ax.set_ylabel("val mAP (%)")
    ax.set_title("COCO mAP on the toy val split")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_losses(run_dirs: dict[str, Path], path: Path, window: int = 20) -> Path:
    """Total loss and (where present) the distillation term per step, smoothed by a moving mean."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for name, run_dir in run_dirs.items():
        log = load_metrics_log(run_dir)
        for ax, key in zip(axes, ("loss", "distill")):
            pts = [(r["step"], r[key]) for r in log if key in r]
            if not pts:
                continue
            steps, vals = zip(*pts)
            smooth = [sum(vals[max(0, i - window + 1): i + 1]) / len(vals[max(0, i - window + 1): i + 1])
                      for i in range(len(vals))]
            ax.plot(steps, smooth, label=name)
    axes[0].set_title("total training loss")
    axes[1].set_title("distillation term (normalised)")
    for ax in axes:
        ax.set_xlabel("step")
        if ax.lines:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
