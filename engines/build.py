"""From a config's ``levels`` section to Betty Problems and their dependency graph."""

from __future__ import annotations

import ast
import dataclasses
import functools
import hashlib
import inspect
import textwrap

from betty.configs import Config as BettyConfig

import mqvae.method.hypergradients  # noqa: F401  (registers the hypergradient types with Betty)
from mqvae.runtime import distributed
from mqvae.config import Config, HypergradientConfig
from mqvae.data import holdout_split
from mqvae.errors import AllRanksError, UserError
from mqvae.data.loader import BatchStream
from mqvae.method.optim import make_optimizer, make_scheduler
from problems import PROBLEMS, FastRollBack

from .engine import LevelEngine


@functools.lru_cache(maxsize=None)
def _attribute_names(cls: type) -> frozenset[str]:
    """Every name ``cls`` or its bases define (``dir``) or assign as ``self.<name> = ...`` in a method (read from
    their source with ``ast``; a class without source contributes its ``dir`` only)."""
    names = set(dir(cls))
    for klass in inspect.getmro(cls):
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store) and \
                    isinstance(node.value, ast.Name) and node.value.id == "self":
                names.add(node.attr)
    return frozenset(names)


def reserved_names(level_cls: type) -> frozenset[str]:
    """The names a level of kind ``level_cls`` may not take. Betty makes every level an attribute of the engine and
    of the other levels under its name, so a name that is an attribute of the engine (Betty's ``Engine`` and
    ``LevelEngine``) or of the level class (Betty's ``Problem``, ``problems.Level`` and the kind) would overwrite it.
    Derived from the classes, so an attribute a new Betty adds is covered without a list to keep."""
    return _attribute_names(LevelEngine) | _attribute_names(level_cls)


def level_graph(cfg: Config) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """Betty's ``u2l`` (upper -> lowers whose best response it differentiates through) and ``l2u``
    (lower -> uppers it triggers after its step), by level name.

    xi = 0 is alternated optimization (Huh §4.2, MQ-VAE §4.4): Eq. 10's phi' is phi itself, so there is no
    tentative lower step and no hypergradient. The upper level then simply steps first, on its direct
    gradient at the current lower parameters, and the lower level steps after it with the updated
    codebook: in Betty's terms the execution edge is reversed and there is no u2l edge at all.
    """
    u2l = {level.name: list(level.lower) for level in cfg.levels if level.lower}
    l2u: dict[str, list[str]] = {}
    for upper, lowers in u2l.items():
        for lower in lowers:
            l2u.setdefault(lower, []).append(upper)
    if cfg.hypergradient.xi == 0:
        if len(cfg.levels) > 2:
            raise UserError("hypergradient.xi: 0 (alternated optimization) is defined for two levels; this config has "
                            f"{len(cfg.levels)}")
        return {}, {upper: lowers for upper, lowers in u2l.items()}
    return u2l, l2u


def level_steps(cfg: Config, l2u: dict[str, list[str]]) -> dict[str, int]:
    """How many steps each level takes in ``train.iters`` iterations, the length of its lr schedule. A lowest level
    (Betty's) steps every iteration; a level above steps once every level below it has completed its inner loop
    (Level._uppers_to_step): every grad_accumulation steps of each, so with the authors' accumulation 4 on both
    levels the codebook steps every 4th iteration and its optimizer every 16th; with hypergradient.unroll_steps k,
    every k-th step of the level below."""
    below: dict[str, list[str]] = {}
    for lower, uppers in l2u.items():
        for upper in uppers:
            below.setdefault(upper, []).append(lower)
    accumulation = {level.name: level.grad_accumulation * (cfg.hypergradient.unroll_steps if level.name in l2u else 1)
                    for level in cfg.levels}

    @functools.lru_cache(maxsize=None)
    def steps(name: str) -> int:
        if name not in below:
            return cfg.train.iters
        return min(steps(lower) // accumulation[lower] for lower in below[name])

    return {level.name: max(1, steps(level.name)) for level in cfg.levels}


def config_warnings(cfg: Config) -> list[str]:
    """Settings that the config gives but that change nothing in this run (each a warning, not an error: a config
    shared by several methods may carry them)."""
    defaults, given = HypergradientConfig(), cfg.hypergradient
    changed = [f"hypergradient.{f.name}" for f in dataclasses.fields(given)
               if getattr(given, f.name) != getattr(defaults, f.name)]
    if changed and not any(level.lower for level in cfg.levels):
        return [f"{', '.join(changed)}: no level of this config has a level below it, so no hypergradient is taken "
                "and these settings change nothing"]
    return []


def derived_seed(seed: int, level_name: str) -> int:
    """The seed of a level's own batch stream, other than the run's main training stream.

    A pure function of the run's seed and the level's name (40 bits, so the stream's per-epoch generator
    seed stays in range): adding, removing or reordering levels shifts no other level's batches."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{level_name}".encode()).digest()[:5], "big")


def build_problems(cfg: Config, model, datasets, device) -> tuple[list, dict]:
    """The configured levels as Betty Problems, and the Betty dependency dict."""
    u2l, l2u = level_graph(cfg)
    betty_children = {}
    for lower, uppers in l2u.items():
        for upper in uppers:
            betty_children.setdefault(upper, []).append(lower)

    steps = level_steps(cfg, l2u)
    holdout = None
    main_stream_taken = False
    # Data-parallel: each rank draws its slice of the batches of one process with ranks x data.batch_size.
    ranks = distributed.world_size()
    shard = (distributed.rank(), ranks)
    problems = {}
    for level in cfg.levels:
        cls = PROBLEMS[level.problem]  # a registered name (checked with the config)
        if cls.trains_prior != bool(cfg.prior.run):
            raise UserError(f"levels.{level.name}.problem: {level.problem} " + (
                "trains a PixelCNN prior; name the run whose codes it learns with prior.run" if cls.trains_prior else
                f"trains the network, but this config trains a prior on the codes of {cfg.prior.run} (a Prior level)"))
        if cls.trains_prior and ranks > 1:
            # Its evaluation (NLL, and FID of samples every rank would draw alike) is not sharded.
            raise AllRanksError(f"levels.{level.name}.problem: a prior trains in one process; run it without torchrun")
        if level.name in reserved_names(cls):
            raise UserError(f"levels.{level.name}.name: '{level.name}' is taken by an attribute of Betty's engine or of "
                            f"the level class {cls.__name__}, which Betty would overwrite with the level; choose another "
                            f"name, e.g. '{level.name}_level'")
        module = cls.module_of(model, level.params).to(device)
        # A level takes a tentative step that another level looks through when it has a level above it; with
        # mutual look-ahead (MQ-VAE‡) the upper level does too, for the lower level's hypergradient.
        looked_through = (level.name in l2u or cfg.hypergradient.mutual) and cfg.hypergradient.xi != 0
        betty_cfg = BettyConfig(
            type=cfg.hypergradient.type,
            # Betty's name for hypergradient.alpha, read by its own methods (darts, sama); ours read Level.alpha.
            darts_alpha=cfg.hypergradient.alpha,
            # The upper loss is differentiated twice (its own parameters, then the lower ones).
            retain_graph=level.name in u2l,
            gradient_clipping=level.grad_clip,
            gradient_accumulation=level.grad_accumulation,
            # hypergradient.unroll_steps: the levels above a level step after every k-th of its steps.
            unroll_steps=cfg.hypergradient.unroll_steps if level.name in l2u else 1,
            log_step=-1,
        )
        data = level.data
        if data == "auto":
            data = "shared" if level.name in betty_children else "train"
        stream = None
        if data == "train":
            # Same seed, same batches: the first level drawing from the training split (the one that trains
            # the encoder in every shipped config) uses the run's seed, whatever the number of levels, so
            # VQ-VAE, alt and MQ-VAE runs at one seed are paired. Any further draw gets a seed of its own.
            seed = derived_seed(cfg.seed, level.name) if main_stream_taken else cfg.seed
            main_stream_taken = True
            stream = BatchStream(datasets.train, cfg.data.batch_size * ranks, seed=seed, num_workers=cfg.data.num_workers,
                                 shard=shard, device=device)
        elif data == "holdout":
            if holdout is None:
                _, holdout = holdout_split(datasets.train, cfg.data.holdout_fraction, seed=cfg.seed)
            stream = BatchStream(holdout, min(cfg.data.batch_size * ranks, len(holdout) // ranks * ranks),
                                 seed=derived_seed(cfg.seed, level.name), num_workers=cfg.data.num_workers, shard=shard,
                                 device=device)
        # Huh Table 10's k inner steps belong to the level that steps first in alternated optimization: the upper
        # level of the config (level_graph reverses Betty's edge at xi = 0).
        inner_steps = cfg.hypergradient.inner_steps if cfg.hypergradient.xi == 0 and level.lower else 1
        if data == "holdout" and (stream.batch_size // ranks) % inner_steps:
            # The config checks data.batch_size; a holdout split smaller than the batch gives smaller batches.
            raise UserError(f"hypergradient.inner_steps: {inner_steps} does not divide the {stream.batch_size // ranks} "
                            f"items per rank of the batches of level '{level.name}' (its holdout split is smaller than "
                            "data.batch_size); raise data.holdout_fraction or choose inner_steps to divide them")
        params = [p for p in module.parameters() if p.requires_grad]
        optimizer = make_optimizer(level, params)
        scheduler = make_scheduler(level, optimizer, cls.scheduled_steps(steps[level.name], level.params))
        # Algorithm 1's roll-back applies to a level with a level above it (Betty's configure_roll_back).
        fast_roll_back = FastRollBack() if cfg.hypergradient.roll_back and level.name in l2u else None
        problems[level.name] = cls(level.name, betty_cfg, module, optimizer, scheduler, stream, model=model,
                                   level_cfg=level, xi=cfg.hypergradient.xi if looked_through else 0.0,
                                   alpha=cfg.hypergradient.alpha, inner_steps=inner_steps, data=data,
                                   fast_roll_back=fast_roll_back, mutual=cfg.hypergradient.mutual)

    for name, problem in problems.items():
        if problem._unroll_steps != problem._config.unroll_steps:
            # Betty reads the private attribute for when the levels above step, but nothing else would follow it (the
            # hypergradient would look through the latest step alone): the config key is the one route.
            raise UserError(f"levels.{name}.problem: {type(problem).__name__} sets Betty's private _unroll_steps = "
                            f"{problem._unroll_steps}; set hypergradient.unroll_steps in the config instead")
        if problem.data == "shared" and not betty_children.get(name):
            raise UserError(f"levels: level '{name}' has data: shared but no level below it to share a batch with")

    dependencies = {
        "u2l": {problems[u]: [problems[l] for l in lowers] for u, lowers in u2l.items()},
        "l2u": {problems[l]: [problems[u] for u in uppers] for l, uppers in l2u.items()},
    }
    return list(problems.values()), dependencies
