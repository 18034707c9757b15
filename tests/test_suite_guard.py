"""The suite's guard (conftest.py) against tests that train a shipped config at its full length."""

from __future__ import annotations

import pytest

from conftest import ROOT, full_length_run

pytest_plugins = ["pytester"]


def test_a_shipped_config_without_train_iters_is_a_full_length_run():
    assert full_length_run(["configs/digits/vqvae.yaml", "--set", "model.hidden_channels=8"]) == "configs/digits/vqvae.yaml"
    assert full_length_run([ROOT / "configs/tables/table1_digits.yaml", "--seeds", "0"])
    assert full_length_run(["configs/digits/vqvae.yaml", "--set", "train.iters=3"]) is None
    assert full_length_run(["--resume", "runs/x"]) is None
    assert full_length_run(["/tmp/elsewhere/my.yaml"]) is None


@pytest.mark.full_run("its inner session runs a shipped config, with training stubbed out")
def test_the_guard_fails_such_a_test_unless_it_is_marked(pytester):
    # An inner session with this suite's conftest: run.main on a shipped config (training stubbed out) fails
    # its test unless the test is marked full_run; with train.iters set it passes.
    pytester.makeconftest((ROOT / "tests" / "conftest.py").read_text())
    pytester.makepyfile(f"""
        import sys
        sys.path.insert(0, {str(ROOT)!r})
        import pytest
        import run
        from engines import experiment

        CONFIG = {str(ROOT / "configs/digits/vqvae.yaml")!r}

        @pytest.fixture(autouse=True)
        def no_training(monkeypatch):
            monkeypatch.setattr(experiment, "run_experiment", lambda *a, **k: {{"test_mse": 0.0}})

        def test_full_length():
            assert run.main([CONFIG]) == 0

        @pytest.mark.full_run("the README's command, as a user runs it")
        def test_marked():
            assert run.main([CONFIG]) == 0

        def test_shortened():
            assert run.main([CONFIG, "--set", "train.iters=2"]) == 0
    """)
    result = pytester.runpytest_inprocess("-q", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=3, errors=1)  # test_full_length passes its call, then errors at teardown
    result.stdout.fnmatch_lines(["*test_full_length*trained the shipped*vqvae.yaml at its full length*"])
