"""``training_curves.png`` from ``metrics.jsonl``: the series read from it, the PNG, the CLI, and a real run.

The synthetic log is what a killed-and-resumed run writes: a first run logs steps 5..40 and saves
checkpoint-30, is killed, and a second run resumes from checkpoint-30 and logs 35..80 again, into the
same file. The killed run's rows past step 30 carry a loss of 9.0, so a curve that kept one shows it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from matplotlib.image import imread

from vitacore.engine.plots import (
    current_rows,
    curve_rows,
    draw_runs,
    draw_training_curves,
    read_rows,
    redraw_training_curves,
    smooth,
)
from vitacore.plot import main as plot_main
from vitacore.recipes import recipe_main

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STALE = 9.0  # the killed run's loss for steps it logged past the checkpoint it is resumed from


def true_loss(step: int) -> float:
    return 2.0 / (1 + 0.05 * step)


def lrs(step: int) -> dict:
    return {"mm_projector": 1e-3 * (1 - step / 100), "llm": 1e-4 * (1 - step / 100)}


def train_row(step: int, **extra) -> dict:
    return {"step": step, "epoch": step / 100, "loss": true_loss(step), "lr": lrs(step), "grad_norm": 1 + step / 100,
            "loss_image": true_loss(step) * 0.8, "loss_text": true_loss(step) * 1.2, **extra}


def eval_row(step: int, **extra) -> dict:
    return {"step": step, "epoch": step / 100, "eval_loss": true_loss(step) + 0.1, "eval_accuracy": step / 100,
            "eval_exact_match": step / 120, **extra}


def resumed_log(resume: bool = True) -> list[dict]:
    rows = []
    for step in range(5, 45, 5):  # the first run, killed after logging step 40
        rows.append(train_row(step, loss=STALE) if step > 30 else train_row(step))
        if step % 10 == 0:
            rows.append(eval_row(step, eval_loss=STALE) if step > 30 else eval_row(step))
        if step == 30:
            rows.append({"step": 30, "event": "checkpoint", "path": "/x/checkpoint-30"})
    if resume:
        rows.append({"step": 30, "event": "resumed", "path": "/x/checkpoint-30"})
    for step in range(35, 85, 5):  # the resumed run
        if step == 50:
            rows.append(train_row(step, loss=None))  # a non-finite loss is logged as null
        elif step == 60:
            rows.append(train_row(step, grad_norm="inf"))
        elif step == 45:
            rows.append(train_row(step, lr=5e-4))  # every group at one LR: logged as one number
        else:
            rows.append(train_row(step))
        if step % 20 == 0:
            rows.append(eval_row(step, eval_exact_match="nan"))
    return rows


def write_log(folder, rows, tail: str = "") -> str:
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "metrics.jsonl")
    with open(path, "w") as fh:
        fh.writelines(json.dumps(row) + "\n" for row in rows)
        fh.write(tail)
    return path


def read_png(path) -> np.ndarray:
    with open(path, "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return imread(path)[..., :3]


def assert_drawn(image: np.ndarray, min_height: int = 400, min_width: int = 600) -> None:
    height, width, _ = image.shape
    assert height >= min_height and width >= min_width, image.shape
    ink = (image.min(axis=2) < 0.9).mean()  # share of pixels that are not (near) white
    assert 0.02 < ink < 0.6, ink
    assert image.std() > 0.05


def red_pixels(image: np.ndarray) -> int:
    """Pixels of the resume line's red, blended with white by anti-aliasing (green = blue, red well above)."""
    r, g, b = image[..., 0], image[..., 1], image[..., 2]
    return int(((r - np.maximum(g, b) > 0.25) & (np.abs(g - b) < 0.08)).sum())


# ---- reading the log ------------------------------------------------------------------------------

def test_a_resume_replaces_the_killed_runs_tail_with_one_continuous_curve(tmp_path):
    curves = curve_rows(write_log(tmp_path, resumed_log(), tail='{"step": 85, "loss": 0.1'))  # a cut-off line
    steps, values = curves.series["loss"]
    assert steps == [s for s in range(5, 85, 5) if s != 50]  # one point per step, ascending; null skipped
    assert values == pytest.approx([true_loss(s) for s in steps])
    assert STALE not in values and STALE not in curves.series["eval_loss"][1]
    assert curves.series["eval_loss"][0] == [10, 20, 30, 40, 60, 80]
    assert curves.resumes == [30] and curves.checkpoints == [30]
    assert curves.series["loss_image"][0] == list(range(5, 85, 5))  # its own series: step 50 has one


def test_without_a_resume_row_the_last_row_per_step_wins(tmp_path):
    rows = [train_row(10, loss=5.0), train_row(20, loss=5.0), eval_row(20), train_row(10, loss=1.0),
            train_row(30)]
    picked = current_rows(read_rows(write_log(tmp_path, rows)))
    assert [(r["step"], "loss" in r) for r in picked] == [(10, True), (20, True), (20, False), (30, True)]
    curves = curve_rows(str(tmp_path / "metrics.jsonl"))
    assert curves.series["loss"] == ([10, 20, 30], [1.0, 5.0, true_loss(30)])
    assert curves.series["eval_loss"] == ([20], [true_loss(20) + 0.1])  # an eval row does not replace a train row


def test_non_finite_values_are_skipped_per_metric(tmp_path):
    curves = curve_rows(write_log(tmp_path, resumed_log()))
    assert 60 not in curves.series["grad_norm"][0] and 55 in curves.series["grad_norm"][0]
    assert 50 not in curves.series["loss"][0] and 50 in curves.series["grad_norm"][0]
    assert curves.series["eval_exact_match"][0] == [10, 20, 30]  # "nan" at 40, 60, 80
    assert curves.series["eval_accuracy"][0] == [10, 20, 30, 40, 60, 80]


def test_learning_rates_per_group_and_one_number_for_all(tmp_path):
    by_group = curve_rows(write_log(tmp_path / "groups", resumed_log())).lr_series()
    assert list(by_group) == ["mm_projector", "llm"]
    steps, values = by_group["llm"]
    assert values[steps.index(45)] == 5e-4 and values[steps.index(40)] == pytest.approx(lrs(40)["llm"])
    single = curve_rows(write_log(tmp_path / "one", [{"step": 1, "loss": 1.0, "lr": 0.1},
                                                      {"step": 2, "loss": 0.9, "lr": 0.2}]))
    assert single.lr_series() == {"lr": ([1, 2], [0.1, 0.2])}


def test_smoothing_is_a_debiased_ema():
    assert smooth([4.0, 4.0, 4.0], span=5) == pytest.approx([4.0, 4.0, 4.0])  # no pull towards 0 at the start
    ema = smooth([0.0, 3.0], span=2)  # alpha 2/3: (2/3*3 + 1/3*2/3*0) / (1 - 1/9)
    assert ema == pytest.approx([0.0, 2.0 / (8 / 9)])


# ---- drawing --------------------------------------------------------------------------------------

def test_draw_training_curves_writes_a_readable_png_and_marks_the_resume(tmp_path):
    resumed, plain = tmp_path / "resumed", tmp_path / "plain"
    write_log(resumed, resumed_log())
    write_log(plain, resumed_log(resume=False))
    path = draw_training_curves(str(resumed))
    assert path == os.path.join(str(resumed), "training_curves.png")
    image = read_png(path)
    assert image.shape[:2] == (800, 1200)
    assert_drawn(image)
    assert sorted(os.listdir(resumed)) == ["metrics.jsonl", "training_curves.png"]  # no temporary file left
    unmarked = read_png(draw_training_curves(str(plain)))
    assert red_pixels(image) > 500 and red_pixels(unmarked) < 50, (red_pixels(image), red_pixels(unmarked))


def test_draw_training_curves_returns_none_without_metrics_or_training_rows(tmp_path):
    assert draw_training_curves(str(tmp_path / "missing")) is None
    assert draw_training_curves(str(tmp_path)) is None
    write_log(tmp_path, [eval_row(10), {"step": 10, "event": "checkpoint", "path": "x"}, train_row(20, loss="inf")])
    assert draw_training_curves(str(tmp_path)) is None
    assert not (tmp_path / "training_curves.png").exists()
    write_log(tmp_path, [train_row(10)])
    assert redraw_training_curves(str(tmp_path), enabled=False) is None
    assert not (tmp_path / "training_curves.png").exists()
    assert redraw_training_curves(str(tmp_path)) == str(tmp_path / "training_curves.png")


def test_draw_training_curves_to_another_path(tmp_path):
    write_log(tmp_path / "run", [train_row(s) for s in (1, 2, 3)])
    target = tmp_path / "pictures" / "run.png"
    assert draw_training_curves(str(tmp_path / "run"), str(target)) == str(target)
    assert_drawn(read_png(target))
    assert not (tmp_path / "run" / "training_curves.png").exists()


def test_draw_runs_refuses_a_label_count_or_a_folder_without_metrics(tmp_path):
    write_log(tmp_path / "a", [train_row(s) for s in (1, 2, 3)])
    with pytest.raises(ValueError, match="2 labels for 1 run folders"):
        draw_runs([str(tmp_path / "a")], str(tmp_path / "x.png"), labels=["a", "b"])
    with pytest.raises(ValueError, match=f"{tmp_path / 'b'} has no metrics.jsonl"):
        draw_runs([str(tmp_path / "a"), str(tmp_path / "b")], str(tmp_path / "x.png"))


# ---- the command line -----------------------------------------------------------------------------

def test_cli_compares_two_runs(tmp_path):
    write_log(tmp_path / "run_a", resumed_log())
    write_log(tmp_path / "run_b", [train_row(s, loss=true_loss(s) * 1.5) for s in range(5, 100, 5)])
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([sys.executable, "-m", "vitacore.plot", str(tmp_path / "run_a"), str(tmp_path / "run_b")],
                            capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "runs_comparison.png"
    assert_drawn(read_png(tmp_path / "runs_comparison.png"))


def test_cli_one_run_writes_its_training_curves(tmp_path, capsys):
    write_log(tmp_path / "run", resumed_log())
    assert plot_main([str(tmp_path / "run")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "run" / "training_curves.png")
    assert_drawn(read_png(tmp_path / "run" / "training_curves.png"))


def test_cli_names_the_folder_without_metrics(tmp_path, capsys):
    write_log(tmp_path / "run", resumed_log())
    (tmp_path / "empty").mkdir()
    assert plot_main([str(tmp_path / "run"), str(tmp_path / "empty"), "--output", str(tmp_path / "c.png")]) == 2
    err = capsys.readouterr().err
    assert f"error: {tmp_path / 'empty'}: no metrics.jsonl in it" in err
    assert not (tmp_path / "c.png").exists()


# ---- a real run -----------------------------------------------------------------------------------

def demo_flags(out, *extra: str) -> list[str]:
    return ["--stage", "1", "--max_steps", "20", "--logging_steps", "2", "--save_steps", "10",
            "--output_dir", str(out), *extra]


def test_a_demo_run_draws_its_curves_unless_told_not_to(dist, vitacore_cache, tmp_path):
    assert recipe_main(demo_flags(tmp_path / "plotted")) == 0
    image = read_png(tmp_path / "plotted" / "training_curves.png")
    assert_drawn(image)
    curves = curve_rows(str(tmp_path / "plotted" / "metrics.jsonl"))
    assert curves.series["loss"][0] == list(range(2, 22, 2)) and curves.checkpoints == [10, 20]
    assert curves.series["eval_accuracy"][0][-1] == 20  # the final eval was logged before the last drawing
    assert recipe_main(demo_flags(tmp_path / "quiet", "--plot_loss", "False")) == 0
    assert (tmp_path / "quiet" / "metrics.jsonl").exists()
    assert not (tmp_path / "quiet" / "training_curves.png").exists()


def test_a_failed_drawing_warns_and_training_goes_on(dist, vitacore_cache, vitacore_log, tmp_path):
    (tmp_path / "out" / "training_curves.png").mkdir(parents=True)  # os.replace onto a folder fails
    argv = ["--stage", "1", "--max_steps", "4", "--logging_steps", "2", "--save_steps", "2",
            "--output_dir", str(tmp_path / "out")]
    assert recipe_main(argv) == 0
    warnings = [line for line in vitacore_log.lines if "training_curves.png not drawn" in line]
    # Checkpoint 2 and the end of the run; checkpoint 4 came seconds after the drawing at 2.
    assert len(warnings) == 2, vitacore_log.text
    assert (tmp_path / "out" / "mm_projector.bin").exists()
    assert [n for n in os.listdir(tmp_path / "out") if n.endswith(".tmp")] == []
