"""Registered names are the config's choices, and a level's ``params`` are validated like the rest of the config."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

import mqvae.method.optim
from engines import experiment
from mqvae.config import spec
from mqvae.errors import UserError
from mqvae.registry import PROBLEMS, Registry
from problems import AutoEncoder, Level, register_problem

from helpers import one_line_error, tiny_config, two_levels


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def levels_with(**lower):
    levels = two_levels()
    levels[1].update(lower)
    return levels


@pytest.mark.parametrize("key, value, needles", [
    ("optimizer", "adm", ["levels.autoencoder.optimizer: 'adm' is not a registered optimizer", "did you mean 'adam'?",
                          "registered: adam, adamw, sgd", "mqvae.method.optim.register_optimizer"]),
    ("scheduler", "cosin", ["levels.autoencoder.scheduler", "did you mean 'cosine'?", "warmup_cosine"]),
    ("problem", "autoencoder", ["levels.autoencoder.problem", "did you mean 'AutoEncoder'?", "problems.register_problem"]),
])
def test_an_unregistered_name_lists_the_registered_ones(key, value, needles):
    with pytest.raises(UserError) as error:
        tiny_config(levels=levels_with(**{key: value}))
    assert all(needle in one_line(error) for needle in needles), str(error.value)


def test_a_registered_optimizer_and_schedule_can_be_named_and_train(tmp_path):
    made = []

    @mqvae.method.optim.register_optimizer("plain_sgd")
    def plain_sgd(level, params):
        made.append(level.name)
        return torch.optim.SGD(params, lr=level.lr)

    class Halving:  # picklable (LambdaLR saves it in the checkpoint)
        def __call__(self, step):
            return 0.5 ** step

    @mqvae.method.optim.register_scheduler("halving")
    def halving(level, total_iters):
        return Halving()

    cfg = tiny_config(levels=levels_with(optimizer="plain_sgd", scheduler="halving", lr=0.1),
                      train={"iters": 3, "log_every": 1})
    engine = experiment.build_engine(cfg, tmp_path)
    lower = next(p for p in engine.problems if p.name == "autoencoder")
    assert made == ["autoencoder"] and type(lower.optimizer) is torch.optim.SGD
    engine.run()
    # Three steps of the schedule: the rate is 0.1 * 0.5^3 afterwards.
    assert lower.optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5 ** 3, rel=1e-12)


def test_a_name_registered_twice_by_two_definitions_is_an_error():
    with pytest.raises(UserError, match="optimizer name 'adam' is registered twice"):
        mqvae.method.optim.register_optimizer("adam")(lambda level, params: None)
    registry = Registry("thing", "register_thing")
    value = object()
    registry.add("x", value)
    registry.add("x", value)  # the same object again: a module imported twice
    assert registry["x"] is value


# -- per-level params ---------------------------------------------------------------------------------------

def define_weighted_level():
    @register_problem
    class WeightedTask(AutoEncoder):
        """The lower level on weight * L_task + the quantizer's terms."""

        @dataclasses.dataclass
        class Params:
            weight: float = spec(1.0, above=0.0, max=10.0)
            note: str = spec("none", choices=["none", "loud"])

        def loss_terms(self, batch):
            terms = self.model.loss(batch, weights=self.loss_weights())
            return {**terms, "loss": terms["loss"] + (self.params.weight - 1.0) * terms["task"]}

    return WeightedTask


@pytest.mark.parametrize("params, needles", [
    ({"wieght": 2.0}, ["levels.autoencoder.params.wieght: unknown key", "did you mean 'weight'?", "valid keys: weight, note"]),
    ({"weight": 0.0}, ["levels.autoencoder.params.weight", "must be greater than 0"]),
    ({"weight": 11.0}, ["levels.autoencoder.params.weight", "above the maximum 10"]),
    ({"weight": "heavy"}, ["levels.autoencoder.params.weight", "expected a number"]),
    ({"note": "quiet"}, ["levels.autoencoder.params.note", "choose one of none, loud"]),
    ("weight=2", ["levels.autoencoder.params", "expected a mapping"]),
])
def test_params_are_validated_like_the_config(params, needles):
    define_weighted_level()
    with pytest.raises(UserError) as error:
        tiny_config(levels=levels_with(problem="WeightedTask", params=params))
    assert all(needle in one_line(error) for needle in needles), str(error.value)


def test_params_reach_the_level_and_its_loss(tmp_path):
    cls = define_weighted_level()
    cfg = tiny_config(levels=levels_with(problem="WeightedTask", params={"weight": 3.0}))
    assert cfg.levels[1].params == cls.Params(weight=3.0, note="none")
    engine = experiment.build_engine(cfg, tmp_path)
    level = next(p for p in engine.problems if p.name == "autoencoder")
    assert level.params.weight == 3.0
    batch = next(iter(torch.utils.data.DataLoader(engine.datasets.train, batch_size=8)))
    terms = engine.model.loss(batch)
    # An independent sum: Eq. 6 as the model states it, with the task term counted 3 times.
    expected = terms["task"] * 3.0 + cfg.quantizer.beta * terms["commitment"] + terms["codebook"]
    torch.testing.assert_close(level.loss_terms(batch)["loss"], expected, rtol=1e-6, atol=1e-8)


def test_a_level_without_params_takes_none():
    with pytest.raises(UserError) as error:
        tiny_config(levels=levels_with(params={"l1": 1.0}))
    assert "levels.autoencoder.params.l1: unknown key; (valid keys: none)" in one_line(error)


def test_a_level_whose_params_is_no_dataclass_is_refused():
    @register_problem
    class Careless(AutoEncoder):
        Params = dict

    with pytest.raises(UserError, match="Careless.Params is not a dataclass"):
        tiny_config(levels=levels_with(problem="Careless"))


def test_three_levels_initial_beta_is_a_level_param(tmp_path):
    levels = [{"name": "commitment_weight", "problem": "CommitmentWeight", "lower": ["autoencoder"],
               "params": {"initial_beta": 0.37}}, *two_levels()]
    engine = experiment.build_engine(tiny_config(levels=levels, quantizer={"beta": 0.1}), tmp_path)
    level = next(p for p in engine.problems if p.name == "commitment_weight")
    assert F.softplus(level.module.rho).item() == pytest.approx(0.37, rel=1e-6)
    # Without it, the level starts at the quantizer's beta.
    levels[0]["params"] = {}
    engine = experiment.build_engine(tiny_config(levels=levels, quantizer={"beta": 0.1}), tmp_path / "default")
    level = next(p for p in engine.problems if p.name == "commitment_weight")
    assert F.softplus(level.module.rho).item() == pytest.approx(0.1, rel=1e-6)


def test_commitment_weight_stays_above_its_floor(tmp_path):
    levels = [{"name": "commitment_weight", "problem": "CommitmentWeight", "lower": ["autoencoder"],
               "params": {"initial_beta": 0.3, "min_beta": 0.05}}, *two_levels()]
    engine = experiment.build_engine(tiny_config(levels=levels, quantizer={"beta": 0.1}), tmp_path)
    level = next(p for p in engine.problems if p.name == "commitment_weight")
    assert level.beta().item() == pytest.approx(0.3, rel=1e-6)
    # beta = min_beta + softplus(rho), by hand in float64, from far below to far above the floor.
    for rho in (-60.0, -3.0, 0.0, 2.5):
        with torch.no_grad():
            level.module.rho.fill_(rho)
        want = 0.05 + math.log1p(math.exp(rho))
        assert level.beta().item() == pytest.approx(want, rel=1e-6) and level.beta().item() >= 0.05
    levels[0]["params"] = {"initial_beta": 0.05, "min_beta": 0.05}
    one_line_error(lambda: experiment.build_engine(tiny_config(levels=levels), tmp_path / "refused"),
                   "min_beta", "initial_beta")


def test_messages_name_a_level_by_its_name():
    with pytest.raises(UserError) as error:
        tiny_config(levels=levels_with(lrr=0.1))
    assert "levels.autoencoder.lrr: unknown key; did you mean 'lr'?" in one_line(error)
    from mqvae.config import config_from_dict

    data = {"levels": two_levels()}
    with pytest.raises(UserError) as error:
        config_from_dict(data, "x.yaml", ["levels.codebok.lr=0.1"])
    assert all(needle in one_line(error) for needle in ("no list item 'codebok'", "names: codebook, autoencoder",
                                                        "did you mean 'codebook'?")), str(error.value)


def test_level_is_the_registry_of_problems():
    assert PROBLEMS is __import__("problems").PROBLEMS
    assert all(issubclass(cls, Level) for cls in PROBLEMS.values())
    with pytest.raises(TypeError):
        register_problem(int)


def test_a_plugin_registers_a_model_kind_and_a_quantizer_kind_that_train(tmp_path):
    """model.kind and quantizer.kind are registries like the others: a plugin's kinds are validated at load (with
    did-you-mean), built, and trained by the engine (here MQ-VAE's two levels, 2 iterations)."""
    from torch import nn

    from mqvae.method.models import ModelKind, register_model, register_quantizer
    from mqvae.method.tasks import RECONSTRUCTION
    from mqvae.nn.quantizers import Quantizer, QuantizerOutput, batch_perplexity, from_vectors, straight_through, \
        to_vectors

    built = []

    @register_model("tiny_conv")
    class TinyConv(ModelKind):
        task = RECONSTRUCTION

        @classmethod
        def halves(cls, cfg, channels, num_classes, image_size):
            built.append("model")
            return (nn.Conv2d(channels, cfg.quantizer.dim, 2, stride=2),
                    nn.ConvTranspose2d(cfg.quantizer.dim, channels, 2, stride=2))

    @register_quantizer("nearest_plain")
    class NearestPlain(Quantizer):
        """The nearest code under straight-through, without any of VectorQuantizer's options."""

        def __init__(self, cfg):
            super().__init__()
            built.append("quantizer")
            self.num_codes, self.beta = cfg.num_codes, cfg.beta
            self.codebook = nn.Parameter(torch.randn(cfg.num_codes, cfg.dim))

        @classmethod
        def check_settings(cls, cfg):
            if cfg.groups != 1:
                raise UserError("quantizer.groups: nearest_plain has one group")

        def forward(self, z_e):
            z = to_vectors(z_e)
            indices = torch.cdist(z, self.codebook).argmin(1)
            q = self.codebook[indices]
            counts = torch.bincount(indices, minlength=self.num_codes)
            losses = {"commitment": F.mse_loss(z, q.detach()), "codebook": F.mse_loss(q, z.detach())}
            return QuantizerOutput(from_vectors(straight_through(z, q), z_e), indices[:, None], losses,
                                   batch_perplexity(counts), counts)

        def loss_weights(self):
            return {"commitment": self.beta, "codebook": 1.0}

        @property
        def task_reaches_codebook(self):
            return False

    cfg = tiny_config(model={"kind": "tiny_conv"}, quantizer={"kind": "nearest_plain", "kmeans_init": False},
                      train={"iters": 2, "log_every": 1})
    engine = experiment.build_engine(cfg, tmp_path)
    assert built[-2:] == ["quantizer", "model"]  # the engine's network (the memory check built narrow ones before)
    assert isinstance(engine.model.quantizer, NearestPlain)
    codebook_before = engine.model.quantizer.codebook.detach().clone()
    engine.run()
    assert engine.global_step == 2
    assert not torch.equal(engine.model.quantizer.codebook, codebook_before)  # the codebook level trained it

    with pytest.raises(UserError, match="model.kind: 'tiny_cnv' is not a registered model kind; did you mean 'tiny_conv'"):
        tiny_config(model={"kind": "tiny_cnv"})
    with pytest.raises(UserError, match="quantizer.kind: 'nearest_plan' is not a registered quantizer kind; did you mean"):
        tiny_config(quantizer={"kind": "nearest_plan"})
    with pytest.raises(UserError, match="nearest_plain has one group"):
        experiment.build_engine(tiny_config(model={"kind": "tiny_conv"},
                                            quantizer={"kind": "nearest_plain", "groups": 2, "kmeans_init": False}),
                                tmp_path / "groups")
