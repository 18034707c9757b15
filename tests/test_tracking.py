"""TensorBoard (logging.tensorboard) holds what log.jsonl holds; curves.png, recon.png and results.png show the right things."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing import event_accumulator  # the test extra installs TensorBoard

import mqvae.evaluation.comparison
import run
from engines import experiment
from mqvae.errors import UserError
from mqvae.io.files import read_lines
from mqvae.evaluation.reports import MIN_CELL_PX, codebook_figure, curve_panels, recon_figure, save_figures
from mqvae.config import load_config
from mqvae.registry import PROBLEMS
from mqvae.evaluation.comparison import aggregate, curve_key, expand, load_sweep, write_results
from mqvae.registry import MODELS
from problems import CommitmentWeight, register_problem
from helpers import interrupt_at, tiny_config, two_levels

TINY = ["--set", "model.hidden_channels=8", "--set", "model.res_channels=4", "--set", "model.num_res_blocks=1",
        "--set", "train.log_every=1", "--set", "device=cpu", "--set", "logging.tensorboard=true"]


def tiny_run(out, *extra):
    return run.main(["configs/digits/mqvae.yaml", *TINY, "--set", "train.iters=6", "--set", "train.eval_every=3",
                     "--out", str(out), *extra])


def events(run_dir: Path):
    accumulator = event_accumulator.EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "images": 0})
    accumulator.Reload()
    return accumulator


def log_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every numeric key of log.jsonl but ``step``, as (step, value) in the order written."""
    scalars: dict[str, list] = {}
    for record in read_lines(run_dir / "log.jsonl"):
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                scalars.setdefault(key, []).append((record["step"], value))
    return scalars


def assert_same_scalars(run_dir: Path) -> None:
    logged, tracked = log_scalars(run_dir), events(run_dir)
    assert sorted(tracked.Tags()["scalars"]) == sorted(logged)
    for key, points in logged.items():
        got = [(e.step, e.value) for e in tracked.Scalars(key)]
        assert [step for step, _ in got] == [step for step, _ in points], key
        assert np.allclose([v for _, v in got], np.float32([v for _, v in points]), rtol=1e-6, atol=0), key


def test_tensorboard_holds_every_scalar_of_the_log_and_the_pictures(tmp_path):
    out = tmp_path / "run"
    assert tiny_run(out) == 0
    logged = log_scalars(out)
    # Training terms of both levels and the evaluation's metrics are all in the log (the test's own premise).
    assert {"codebook.loss", "autoencoder.perplexity", "time_s", "test_mse", "active_codes"} <= set(logged)
    assert [step for step, _ in logged["test_mse"]] == [3, 6]
    assert_same_scalars(out)
    tracked = events(out)
    for name in ("recon", "codebook"):
        images = tracked.Images(name)
        assert [image.step for image in images] == [3, 6], name  # the final pictures are step 6's, once
        assert images[0].width >= 16 * MIN_CELL_PX if name == "recon" else images[0].width > 0


def test_a_warning_record_has_no_scalar(tmp_path):
    from mqvae.io.tracking import TensorBoard

    writer = TensorBoard(tmp_path)
    writer.scalars({"step": 1, "warning": "something", "a.loss": 0.5, "flag": True})
    writer.close()
    tracked = events(tmp_path)
    assert tracked.Tags()["scalars"] == ["a.loss"]


def test_a_resumed_run_has_no_duplicate_steps(tmp_path, monkeypatch):
    args = ["--set", "train.checkpoint_every=3"]
    restore = interrupt_at(monkeypatch, 5)
    assert tiny_run(tmp_path / "cut", *args) == 130
    restore()
    # Step 4 reached TensorBoard before the cut: the resumed run writes it again, after the checkpoint at 3.
    assert [e.step for e in events(tmp_path / "cut").Scalars("codebook.loss")] == [1, 2, 3, 4]
    assert run.main(["--resume", str(tmp_path / "cut")]) == 0
    assert [e.step for e in events(tmp_path / "cut").Scalars("codebook.loss")] == [1, 2, 3, 4, 5, 6]
    assert_same_scalars(tmp_path / "cut")
    # The files themselves hold each (tag, step) as often as log.jsonl does (time_s is in both the training and the
    # evaluation record of an evaluation step), whatever a loader does with purge events.
    from collections import Counter

    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    written = Counter((value.tag, event.step) for path in sorted((tmp_path / "cut").glob("events.out.tfevents.*"))
                      for event in EventFileLoader(str(path)).Load() for value in event.summary.value
                      if value.metadata.plugin_data.plugin_name != "images")  # the pictures are not in the log
    logged = Counter((key, step) for key, points in log_scalars(tmp_path / "cut").items() for step, _ in points)
    assert written[("codebook.loss", 4)] == 1 and written == logged


def test_overwrite_removes_the_old_event_files(tmp_path):
    out = tmp_path / "run"
    assert tiny_run(out) == 0
    assert tiny_run(out) == 2  # the folder holds a run
    assert tiny_run(out, "--overwrite") == 0
    assert len(list(out.glob("events.out.tfevents.*"))) == 1
    assert_same_scalars(out)


def test_missing_tensorboard_is_one_line_at_build_time(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as without the package
    cfg = tiny_config(logging={"tensorboard": True})
    with pytest.raises(UserError) as error:
        experiment.build_engine(cfg, tmp_path)
    assert '".[tensorboard]"' in str(error.value) and "pip install" in str(error.value)
    assert len(str(error.value).splitlines()) == 1
    assert not any(tmp_path.iterdir())


# -- curves.png ---------------------------------------------------------------------------------------

def test_curves_plot_the_learned_beta_of_three_levels(tmp_path, monkeypatch):
    panels = []
    draw = experiment.curves_figure
    monkeypatch.setattr(experiment, "curves_figure", lambda p: panels.extend(p) or draw(p))
    assert run.main(["configs/digits/three_levels.yaml", *TINY[:-2], "--set", "train.iters=2",
                     "--out", str(tmp_path / "three")]) == 0
    titles = [panel.title for panel in panels]
    # three_levels.yaml's CommitmentWeight level is named commitment_weight and learns beta.
    beta = next(panel for panel in panels if "commitment_weight.beta" in panel.lines)
    records = read_lines(tmp_path / "three" / "log.jsonl")
    logged = [r["commitment_weight.beta"] for r in records if "commitment_weight.beta" in r]
    assert beta.lines["commitment_weight.beta"][1] == logged and len(logged) == 2
    # One perplexity line, the encoder-decoder level's; no panel plots another level's perplexity.
    perplexity = [panel for panel in panels if any(k.endswith(".perplexity") for k in panel.lines)]
    assert len(perplexity) == 1 and list(perplexity[0].lines) == ["autoencoder.perplexity"]
    # 2 iterations, eval_every 250 (three_levels.yaml): the one evaluation is the last iteration's.
    test = panels[titles.index("test MSE (per pixel)")]
    assert test.lines == {"test_mse": ([2], [next(r["test_mse"] for r in records if "test_mse" in r)])}


def test_the_last_iteration_is_evaluated_and_plotted_when_eval_every_does_not_divide_iters(tmp_path, monkeypatch):
    panels = []
    draw = experiment.curves_figure
    monkeypatch.setattr(experiment, "curves_figure", lambda p: panels.extend(p) or draw(p))
    out = tmp_path / "run"
    assert run.main(["configs/digits/vqvae.yaml", *TINY[:-2], "--set", "train.iters=5", "--set", "train.eval_every=2",
                     "--out", str(out)]) == 0
    evaluations = [r for r in read_lines(out / "log.jsonl") if "test_mse" in r]
    assert [r["step"] for r in evaluations] == [2, 4, 5]
    assert set(evaluations[-1]) == set(evaluations[0])  # the final record is an evaluation record like the others
    test = next(panel for panel in panels if panel.title == "test MSE (per pixel)")
    assert test.lines["test_mse"] == ([2, 4, 5], [r["test_mse"] for r in evaluations])


def test_a_resume_after_the_last_checkpoint_logs_the_final_evaluation_once(tmp_path):
    out = tmp_path / "run"
    args = ["configs/digits/vqvae.yaml", *TINY[:-2], "--set", "train.iters=5", "--set", "train.eval_every=2"]
    assert run.main([*args, "--out", str(out)]) == 0
    finished = read_lines(out / "log.jsonl")
    # As if killed in the final evaluation, after the last checkpoint (iteration 5) and before metrics.json.
    (out / "metrics.json").unlink()
    assert run.main(["--resume", str(out)]) == 0
    assert read_lines(out / "log.jsonl") == finished


def test_the_test_panel_is_titled_by_the_task_with_or_without_evaluations():
    train = [{"step": 1, "classifier.loss": 2.0, "classifier.perplexity": 3.0}, {"step": 1, "warning": "w"}]
    classification = MODELS["resnet18"].task
    panel = curve_panels(train, classification, perplexity="classifier.perplexity")[-1]
    assert (panel.title, panel.lines, panel.note) == ("test accuracy", {}, "no evaluation during training")
    evaluated = train + [{"step": 1, "time_s": 0.1, "accuracy": 0.5}]
    panel = curve_panels(evaluated, classification)[-1]
    assert (panel.title, panel.lines, panel.note) == ("test accuracy", {"accuracy": ([1], [0.5])}, "")
    assert curve_panels(evaluated, MODELS["vqvae"].task)[-1].title == "test MSE (per pixel)"


def test_a_sweeps_curves_name_its_task_also_before_any_run_finished(tmp_path, monkeypatch):
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text("sweep:\n  seeds: [0]\n  metrics: [accuracy]\n  runs:\n"
                          f"    - {{label: A, config: {Path('configs/digits/classify_vqvae.yaml').resolve()}}}\n")
    sweep = load_sweep(sweep_file)
    planned = expand(sweep, tmp_path / "out")
    key = curve_key([load_config(run.config, run.overrides) for run in planned])
    assert key == "accuracy"
    drawn = []
    monkeypatch.setattr(mqvae.evaluation.comparison, "save_figure", lambda figure, path: drawn.append(figure))
    write_results(aggregate(sweep, planned, key), tmp_path / "out")  # no run has metrics: the plot still draws
    assert all(axes.get_xlabel() and axes.get_ylabel() for axes in drawn[0].axes)


def test_curves_show_test_code_usage_and_label_every_axis():
    records = [{"step": 1, "vqvae.loss": 0.5, "vqvae.perplexity": 3.0},
               {"step": 2, "time_s": 0.1, "test_mse": 0.2, "perplexity": 7.5, "active_codes": 9},
               {"step": 4, "time_s": 0.2, "test_mse": 0.1, "perplexity": 9.5, "active_codes": 12}]
    panels = curve_panels(records, MODELS["vqvae"].task, perplexity="vqvae.perplexity")
    usage = next(panel for panel in panels if panel.title == "test code usage")
    assert usage.lines == {"perplexity": ([2, 4], [7.5, 9.5]), "active_codes": ([2, 4], [9, 12])}
    assert all(panel.ylabel for panel in panels), [panel.title for panel in panels if not panel.ylabel]


class ScheduledWarmUp(CommitmentWeight):
    """CommitmentWeight that also logs a warm-up factor following its step count, named as learned by mistake."""

    learned_scalars = ("beta", "warmup")

    def loss_terms(self, batch):
        return {**super().loss_terms(batch), "warmup": torch.tensor(min(1.0, self._count / 4))}


@pytest.fixture
def scheduled_warm_up():
    saved = PROBLEMS.copy()
    register_problem(ScheduledWarmUp)
    yield
    PROBLEMS.clear()
    PROBLEMS.update(saved)


def test_only_a_scalar_its_levels_parameters_reach_is_called_learned(tmp_path, monkeypatch, scheduled_warm_up):
    panels = []
    draw = experiment.curves_figure
    monkeypatch.setattr(experiment, "curves_figure", lambda p: panels.extend(p) or draw(p))
    levels = [{"name": "commitment_weight", "problem": "ScheduledWarmUp", "lower": ["autoencoder"], "data": "holdout"},
              *two_levels()]
    cfg, out = tiny_config(levels=levels), tmp_path / "run"
    experiment.run_experiment(cfg, out)
    expected = {"learned commitment_weight.beta", "commitment_weight.warmup (not learned)"}
    assert expected <= {panel.title for panel in panels}
    # Resumed at its end (a kill before metrics.json): no step in this process, the checkpoint says which.
    (out / "metrics.json").unlink()
    panels.clear()
    experiment.run_experiment(cfg, out, resume=True)
    assert expected <= {panel.title for panel in panels}


# -- recon.png ----------------------------------------------------------------------------------------

def test_recon_png_is_labelled_large_and_keeps_each_input_above_its_reconstruction(tmp_path):
    n, side = 32, 16  # the digits: 1x16x16
    originals = torch.stack([torch.full((1, side, side), 0.1 + 0.012 * i) for i in range(n)])
    recons = torch.stack([torch.full((1, side, side), 0.5 + 0.012 * i) for i in range(n)])
    figure = recon_figure(originals, recons, "run: iteration 3, test_mse 0.01")
    assert {"input", "reconstruction"} <= {text.get_text() for text in figure.texts}
    # The title in a band of its own above the images.
    assert figure._suptitle.get_text() == "run: iteration 3, test_mse 0.01"
    assert figure._suptitle.get_position()[1] > figure.axes[0].get_position().y1
    canvas = np.asarray(figure.axes[0].images[0].get_array())

    def box(value):
        ys, xs = np.nonzero(np.isclose(canvas, value, atol=1e-4))
        return ys.min(), ys.max(), xs.min(), xs.max()

    for i in range(n):
        top, bottom, left, right = box(0.1 + 0.012 * i)
        recon_top, recon_bottom, recon_left, recon_right = box(0.5 + 0.012 * i)
        assert bottom - top + 1 >= MIN_CELL_PX and right - left + 1 >= MIN_CELL_PX
        assert (recon_left, recon_right) == (left, right)  # same column
        assert 0 < recon_top - bottom < MIN_CELL_PX  # directly below, nothing in between
    save_figures({"recon": figure}, tmp_path)
    width, height = Image.open(tmp_path / "recon.png").size
    assert width >= 16 * MIN_CELL_PX and height >= 4 * MIN_CELL_PX  # 16 per row, 2 rows of pairs


def test_recon_png_is_titled_by_the_run_the_iteration_and_its_test_mse(tmp_path, monkeypatch):
    saved = {}
    monkeypatch.setattr(experiment, "save_figures", lambda figures, run_dir: saved.update(figures))
    out = tmp_path / "tiny"
    assert run.main(["configs/digits/vqvae.yaml", *TINY[:-2], "--set", "train.iters=3", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert saved["recon"]._suptitle.get_text() == f"tiny: iteration 3, test_mse {metrics['test_mse']:.5g}"




# -- codebook.png -------------------------------------------------------------------------------------

def test_codebook_png_draws_used_codes_over_unused_ones_and_counts_both():
    counts = torch.tensor([5, 0, 0, 3, 0])
    codes = torch.zeros(5, 2)  # every code in one place: what is on top is all that shows
    vectors = torch.randn(20, 2, generator=torch.Generator().manual_seed(0))
    usage, projection = codebook_figure(counts, vectors, codes).axes
    assert "2 of 5 codes used" in usage.get_title() and "2 of 5 codes used" in projection.get_title()
    drawn = {collection.get_label(): collection for collection in projection.collections}
    used, unused = drawn["used codes (2)"], drawn["unused codes (3)"]
    assert (len(used.get_offsets()), len(unused.get_offsets())) == (2, 3)
    assert used.get_zorder() > unused.get_zorder()
    # Unused codes stay visible: an opaque edge of another colour than the used codes' fill.
    edge, fill = unused.get_edgecolor()[0], used.get_facecolor()[0]
    assert edge[3] == 1 and not np.allclose(edge[:3], fill[:3])
    assert all(axes.get_xlabel() and axes.get_ylabel() for axes in (usage, projection))
