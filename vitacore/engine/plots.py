"""A picture of a run: ``training_curves.png`` drawn from ``metrics.jsonl``, and several runs side by side.

:func:`curve_rows` turns the log into series, one point per step: a resumed run appends to the
same file, so a ``resumed`` row at step S drops the earlier rows past S, and of several rows for
one step the last one written wins. Values that are not finite numbers (``null``, ``"inf"``,
``"nan"``) are skipped. :func:`draw_training_curves` and :func:`draw_runs` draw with matplotlib's
object API on the Agg canvas (no display needed; matplotlib is imported only then) and write the PNG
atomically.
"""

from __future__ import annotations

import os
import time
from typing import Optional, Sequence

from vitacore.console import logger
from vitacore.engine.curves import Curves, Series, current_rows, curve_rows, read_rows, smooth, smoothing_span

__all__ = ["CURVES_FILE", "METRICS_FILE", "CurveRedraws", "current_rows", "curve_rows", "draw_runs",
           "draw_training_curves", "read_rows", "redraw_training_curves", "smooth", "smoothing_span"]

METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "training_curves.png"
# Eval scores in [0, 1], drawn in the accuracy panel when present.
EVAL_SCORES = ("eval_accuracy", "eval_exact_match", "eval_generate_exact_match", "eval_generate_f1")
MODALITY_LOSSES = ("loss_image", "loss_video", "loss_audio", "loss_text")
_RESUME_COLOR, _CHECKPOINT_COLOR = "tab:red", "0.55"

def draw_training_curves(output_dir: str, path: Optional[str] = None) -> Optional[str]:
    """Draw ``output_dir/metrics.jsonl`` as a four-panel PNG.

    Panels: (a) training loss, raw and EMA-smoothed, eval loss and per-modality losses; (b) learning
    rate per param group; (c) gradient norm; (d) eval accuracy / exact match. Resumes are dashed red
    vertical lines, checkpoints small grey marks on the bottom edge.

    Args:
        output_dir: a run's output folder.
        path: where to write (default ``output_dir/training_curves.png``).

    Returns:
        The path written, or None when there is no ``metrics.jsonl`` or it has no training row yet.
    """
    metrics = os.path.join(output_dir, METRICS_FILE)
    if not os.path.isfile(metrics):
        return None
    curves = curve_rows(metrics)
    if not curves.has_training:
        return None
    path = path or os.path.join(output_dir, CURVES_FILE)
    fig = _figure(12, 8)
    (loss_ax, lr_ax), (grad_ax, score_ax) = fig.subplots(2, 2, sharex=True)
    _loss_panel(loss_ax, curves)
    _lr_panel(lr_ax, curves.lr_series())
    _grad_panel(grad_ax, curves.series.get("grad_norm"))
    _score_panel(score_ax, curves)
    for ax in (loss_ax, lr_ax, grad_ax, score_ax):
        _mark_events(ax, curves, label=ax is loss_ax)
        ax.grid(True, alpha=0.3)
    for ax in (grad_ax, score_ax):
        ax.set_xlabel("optimizer step")
    fig.suptitle(_title(output_dir, curves), fontsize=12)
    fig.tight_layout()
    _save(fig, path)
    return path


class CurveRedraws:
    """When the Trainer redraws ``training_curves.png``: at a checkpoint when at least
    ``min_interval_s`` passed since the last drawing (a drawing costs about a second of CPU, so
    checkpoints seconds apart share one), and always at the end of the run.

    Args:
        output_dir: the run's folder (``metrics.jsonl`` in, the PNG out).
        enabled: ``loop.plot_loss`` on the main rank.
        min_interval_s: the least time between two checkpoint drawings.
    """

    def __init__(self, output_dir: str, enabled: bool, min_interval_s: float = 60.0):
        self.output_dir, self.enabled, self.min_interval_s = output_dir, enabled, min_interval_s
        self._last = float("-inf")

    def at_checkpoint(self) -> Optional[str]:
        """Redraw if the last drawing is old enough."""
        if time.monotonic() - self._last < self.min_interval_s:
            return None
        return self.at_end()

    def at_end(self) -> Optional[str]:
        """Redraw now."""
        self._last = time.monotonic()
        return redraw_training_curves(self.output_dir, self.enabled)


def redraw_training_curves(output_dir: str, enabled: bool = True) -> Optional[str]:
    """The Trainer's call: :func:`draw_training_curves` when ``enabled`` (``loop.plot_loss``, main rank).

    A failure is a one-line warning on the vitacore logger, never an error. Returns the path or None.
    """
    if not enabled:
        return None
    try:
        return draw_training_curves(output_dir)
    except Exception as exc:  # a picture must never stop training
        logger.warning(f"warning: training_curves.png not drawn ({type(exc).__name__}: {exc}); training goes on "
                       "(--plot_loss False turns the picture off)")
        return None


def draw_runs(run_dirs: Sequence[str], path: str, labels: Optional[Sequence[str]] = None) -> str:
    """Draw several runs' training loss, eval loss and learning rate on one chart for comparison.

    Args:
        run_dirs: output folders, each with a ``metrics.jsonl``.
        path: the PNG to write.
        labels: one legend label per run (default: the folder names).

    Returns:
        ``path``.

    Raises:
        ValueError: ``labels`` does not match ``run_dirs``, or a folder has no ``metrics.jsonl`` or no
            training row in it.
    """
    if labels is not None and len(labels) != len(run_dirs):
        raise ValueError(f"draw_runs: {len(labels)} labels for {len(run_dirs)} run folders; give one label per "
                         f"folder, or none")
    labels = list(labels) if labels is not None else _run_labels(run_dirs)
    runs = []
    for run_dir in run_dirs:
        metrics = os.path.join(run_dir, METRICS_FILE)
        if not os.path.isfile(metrics):
            raise ValueError(f"{run_dir} has no {METRICS_FILE}; pass a run's --output_dir")
        curves = curve_rows(metrics)
        if not curves.has_training:
            raise ValueError(f"{metrics} has no training row (no finite 'loss') yet; plot it once it has logged")
        runs.append(curves)
    fig = _figure(16, 5.5)
    loss_ax, eval_ax, lr_ax = fig.subplots(1, 3, sharex=True)
    for i, (curves, label) in enumerate(zip(runs, labels)):
        color = f"C{i % 10}"  # matplotlib's default cycle
        steps, values = curves.series["loss"]
        loss_ax.plot(steps, values, color=color, alpha=0.25, linewidth=0.8)
        loss_ax.plot(steps, smooth(values, smoothing_span(len(values))), color=color, linewidth=1.8,
                     label=f"{label} (EMA)")
        if "eval_loss" in curves.series:
            eval_ax.plot(*curves.series["eval_loss"], color=color, marker="o", markersize=3, label=label)
        for (group, series), style in zip(curves.lr_series().items(), ("-", "--", ":", "-.") * 8):
            name = label if group == "lr" else f"{label} / {group}"
            lr_ax.plot(*series, color=color, linestyle=style, label=name)
        for ax in (loss_ax, eval_ax, lr_ax):
            for step in curves.resumes:
                ax.axvline(step, color=color, linestyle="--", linewidth=0.9, alpha=0.7)
    _log_scale_if_wide(loss_ax, [v for c in runs for v in c.series["loss"][1]])
    _log_scale_if_wide(eval_ax, [v for c in runs for v in c.series.get("eval_loss", ((), ()))[1]])
    if not any("eval_loss" in c.series for c in runs):
        _empty(eval_ax, "no eval_loss logged")
    lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    for ax, title in ((loss_ax, "training loss (faint: raw; solid: EMA)"), (eval_ax, "eval loss"),
                      (lr_ax, "learning rate (dashed lines: resumes)")):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("optimizer step")
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(f"{len(runs)} runs compared", fontsize=12)
    fig.tight_layout()
    _save(fig, path)
    return path


def _loss_panel(ax, curves: Curves) -> None:
    steps, values = curves.series["loss"]
    span = smoothing_span(len(values))
    ax.plot(steps, values, color="tab:blue", alpha=0.35, linewidth=0.9, label="train loss (raw)")
    if len(values) >= 5:
        ax.plot(steps, smooth(values, span), color="tab:blue", linewidth=2.0,
                label=f"train loss (EMA, span {span} rows)")
    shown = list(values)
    modalities = [name for name in MODALITY_LOSSES if name in curves.series]
    for name, color in zip(modalities if len(modalities) > 1 else (), ("tab:purple", "tab:brown", "tab:olive", "C9")):
        ax.plot(*curves.series[name], color=color, linewidth=0.7, alpha=0.8, label=name)  # one alone is the loss
        shown += curves.series[name][1]
    if "eval_loss" in curves.series:
        ax.plot(*curves.series["eval_loss"], color="tab:orange", marker="o", markersize=4, linewidth=1.3,
                label="eval loss")
        shown += curves.series["eval_loss"][1]
    _log_scale_if_wide(ax, shown)
    ax.set_title("(a) loss", fontsize=10)


def _lr_panel(ax, lrs: dict[str, Series]) -> None:
    ax.set_title("(b) learning rate" + (" per param group" if len(lrs) > 1 else ""), fontsize=10)
    if not lrs:
        _empty(ax, "no lr logged")
        return
    for (group, series), style in zip(lrs.items(), ("-", "--", "-.", ":") * 8):
        ax.plot(*series, linestyle=style, linewidth=1.5, label=group)
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    if len(lrs) > 1:
        ax.legend(fontsize=8, loc="best")


def _grad_panel(ax, series: Optional[Series]) -> None:
    ax.set_title("(c) gradient norm (before clipping)", fontsize=10)
    if not series or not series[0]:
        _empty(ax, "no grad_norm logged (ZeRO-3 logs none on some versions)")
        return
    ax.plot(*series, color="tab:green", linewidth=1.0)
    _log_scale_if_wide(ax, series[1])


def _score_panel(ax, curves: Curves) -> None:
    ax.set_title("(d) eval accuracy / exact match", fontsize=10)
    present = [name for name in EVAL_SCORES if name in curves.series]
    if not present:
        _empty(ax, "no eval accuracy logged (set --eval_strategy steps and an eval set)")
        return
    for name, marker in zip(present, ("o", "s", "^", "D")):
        steps, values = curves.series[name]
        ax.plot(steps, values, marker=marker, markersize=4, linewidth=1.3, label=f"{name} (last {values[-1]:.3f})")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=8, loc="lower right")


def _mark_events(ax, curves: Curves, label: bool) -> None:
    """Resumes as dashed red lines; checkpoints as small grey marks on the panel's bottom edge."""
    for i, step in enumerate(curves.resumes):
        ax.axvline(step, color=_RESUME_COLOR, linestyle="--", linewidth=1.2,
                   label=f"resumed at step {step}" if label and i < 3 else None)
    if curves.checkpoints:
        ax.plot(curves.checkpoints, [0.0] * len(curves.checkpoints), linestyle="none", marker="^", markersize=6,
                color=_CHECKPOINT_COLOR, alpha=0.8, transform=ax.get_xaxis_transform(), clip_on=False,
                label="checkpoint" if label else None)
    if label:
        ax.legend(fontsize=8, loc="upper right")


def _title(output_dir: str, curves: Curves) -> str:
    steps, losses = curves.series["loss"]
    parts = [os.path.basename(os.path.normpath(os.path.abspath(output_dir))), f"step {steps[-1]}",
             f"loss {losses[0]:.4g} -> {losses[-1]:.4g}"]
    parts += [f"{name.replace('_', ' ')} {curves.series[name][1][-1]:.4g}" for name in ("eval_loss", "eval_accuracy")
              if name in curves.series]
    if curves.resumes:
        parts.append(f"resumed {len(curves.resumes)}x")
    return "   |   ".join(parts)


def _log_scale_if_wide(ax, values: Sequence[float]) -> None:
    """A log y axis when every value is positive and they span more than 30x."""
    if values and min(values) > 0 and max(values) / min(values) > 30:
        ax.set_yscale("log")


def _empty(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", color="0.4", fontsize=9)


def _run_labels(run_dirs: Sequence[str]) -> list[str]:
    """Folder names; the full paths where two runs share a name."""
    names = [os.path.basename(os.path.normpath(os.path.abspath(d))) for d in run_dirs]
    return names if len(set(names)) == len(names) else [os.path.normpath(d) for d in run_dirs]


def _figure(width: float, height: float):
    """A matplotlib Figure on the Agg canvas (object API: no pyplot state, no display)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str) -> None:
    """Write ``fig`` as PNG to a temporary file beside ``path``, then move it into place."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        fig.savefig(tmp, format="png")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
