"""The figures of `ember bench sched`: the completion-time CDF (`--plot`) and mean
completion time against request rate (`--curve-plot`), as PNGs."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str | Path) -> None:
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)  # e.g. results/, ignored by git
    fig.savefig(path, dpi=120)


def plot_jct_cdf(jcts: Mapping[str, Sequence[float]], path: str | Path, title: str) -> None:
    """The CDF of job completion time per policy."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for policy, values in jcts.items():
        xs = sorted(values)
        ys = [(i + 1) / len(xs) for i in range(len(xs))]
        ax.step(xs, ys, where="post", label=policy)
    ax.set_xlabel("job completion time (s)")
    ax.set_ylabel("fraction of requests")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, path)
    plt.close(fig)


def plot_curve(
    curve: Mapping[str, Sequence[Mapping[str, Any]]], threshold_s: float, path: str | Path, title: str
) -> None:
    """Mean JCT against request rate, one line per policy, the SLO as a dashed line."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for policy, points in curve.items():
        pts = sorted(points, key=lambda p: p["rate_req_s"])
        ax.plot([p["rate_req_s"] for p in pts], [p["mean_jct_s"] for p in pts], marker="o", label=policy)
    ax.axhline(threshold_s, color="grey", linestyle="--", linewidth=1, label="SLO")
    ax.set_xlabel("request rate (req/s)")
    ax.set_ylabel("mean job completion time (s)")
    ax.set_yscale("log")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    _save(fig, path)
    plt.close(fig)
