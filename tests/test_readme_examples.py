"""The README's examples of extending the toolkit run as written and train.

Whatever code the README holds under "Adding a level", and in the section whose Python block calls
``register_hypergradient``, is executed in a fresh namespace; then a tiny 2-iteration experiment
(``engines.experiment.run_experiment``) uses what it registered, configured by the section's YAML block(s)
merged into ``helpers.tiny_config``. The test asserts that the snippet's own code ran during training and that
the parameters it should move moved: the new level's, or the upper level's for a hypergradient method.
"""

from __future__ import annotations

import ast
import re
import sys
import types
from pathlib import Path

import pytest
import torch
import yaml

import betty.hypergradient
import mqvae.config
import mqvae.errors
import mqvae.data
import mqvae.method.hypergradients
import mqvae.method.optim
import mqvae.registry
import problems.levels
from engines import experiment

from helpers import tiny_config

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
CALLS = "__readme_calls__"


# -- reading the README ---------------------------------------------------------------------------------------

def sections() -> dict[str, str]:
    """Each heading's title -> its text up to the next heading (any level), fenced code blocks included."""
    found, title, lines, fenced = {}, None, [], False
    for line in README.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            fenced = not fenced
        if not fenced and re.match(r"#{1,6} ", line):
            if title is not None:
                found[title] = "\n".join(lines)
            title, lines = line.lstrip("#").strip(), []
        else:
            lines.append(line)
    if title is not None:
        found[title] = "\n".join(lines)
    return found


def code_blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}[ \t]*\n(.*?)^```", text, flags=re.DOTALL | re.MULTILINE)


def level_section() -> str:
    return sections()["Adding a level"]


def hypergradient_section() -> str:
    matches = [text for text in sections().values()
               if any("register_hypergradient" in block for block in code_blocks(text, "python"))]
    assert matches, "no README section has a Python block that calls register_hypergradient"
    return matches[0]


def example_config(text: str) -> dict:
    """The section's YAML blocks, merged (later blocks win)."""
    merged = {}
    for block in code_blocks(text, "yaml"):
        merged.update(yaml.safe_load(block) or {})
    return merged


# -- running a snippet ------------------------------------------------------------------------------------------

class _RecordCalls(ast.NodeTransformer):
    """Make every function of the snippet note its name in ``__readme_calls__`` when it runs."""

    def visit_FunctionDef(self, node):
        self.generic_visit(node)
        note = ast.parse(f"{CALLS}.append({node.name!r})").body[0]
        docstring = node.body[:1] if node.body and isinstance(node.body[0], ast.Expr) \
            and isinstance(node.body[0].value, ast.Constant) and isinstance(node.body[0].value.value, str) else []
        node.body = docstring + [note] + node.body[len(docstring):]
        return node

    visit_AsyncFunctionDef = visit_FunctionDef


def run_snippet(blocks: list[str], where: str) -> dict:
    """Execute an example's code blocks, in order, in one fresh namespace; their functions record their calls
    in ``namespace[CALLS]``."""
    # A module of its own, as a user's file would be (dataclasses look their module up in sys.modules).
    module = types.ModuleType("readme_example")
    sys.modules[module.__name__] = module
    namespace = vars(module)
    namespace[CALLS] = []
    for i, source in enumerate(blocks):
        name = f"<README.md: {where}, block {i + 1}>"
        tree = ast.fix_missing_locations(_RecordCalls().visit(ast.parse(source, filename=name)))
        # dont_inherit: the snippet runs as written, without this file's `from __future__ import annotations`.
        exec(compile(tree, name, "exec", dont_inherit=True), namespace)
    return namespace


@pytest.fixture
def registries():
    """Put back every module-level registry (dict or list) the snippets may add to, so that no other test sees
    the README's level or hypergradient method."""
    modules = (problems.levels, mqvae.method.hypergradients, mqvae.config, mqvae.registry, mqvae.method.optim, mqvae.data,
               betty.hypergradient)
    saved = [(container, container.copy()) for module in modules for container in vars(module).values()
             if isinstance(container, (dict, list))]
    yield
    for container, contents in saved:
        if isinstance(container, dict):
            container.clear()
            container.update(contents)
        else:
            container[:] = contents


def run_tiny(tmp_path, monkeypatch, cfg, trained, calls: list) -> tuple[list, list, object]:
    """``run_experiment`` on ``cfg`` for its 2 iterations; returns the parameters ``trained(engine)`` names,
    as built and after training, and the engine. ``calls`` is emptied once the engine is built, so that it
    holds what ran from then on."""
    built = {}
    build = experiment.build_engine

    def build_and_remember(*args, **kwargs):
        engine = build(*args, **kwargs)
        built["engine"] = engine
        built["before"] = [p.detach().clone() for p in trained(engine)]
        calls.clear()
        return engine

    monkeypatch.setattr(experiment, "build_engine", build_and_remember)
    experiment.run_experiment(cfg, tmp_path / "run")
    engine = built["engine"]
    return built["before"], [p.detach() for p in trained(engine)], engine


def changed(before, after) -> bool:
    return len(before) == len(after) > 0 and any(not torch.equal(b, a) for b, a in zip(before, after))


# -- the examples -----------------------------------------------------------------------------------------------

def test_the_adding_a_level_example_trains(tmp_path, monkeypatch, registries):
    text = level_section()
    blocks = code_blocks(text, "python")
    assert blocks, "README, Adding a level: no Python block"
    known = dict(problems.levels.PROBLEMS)
    namespace = run_snippet(blocks, "Adding a level")
    new = {name: cls for name, cls in problems.levels.PROBLEMS.items() if known.get(name) is not cls}
    assert new, "the example registered no level (problems.register_problem)"

    data = example_config(text)
    assert "levels" in data, "README, Adding a level: no YAML block with the levels that use the new level"
    assert set(new) <= {level["problem"] for level in data["levels"]}, "the example's config does not use its level"
    cfg = tiny_config(levels=data["levels"], hypergradient=data.get("hypergradient"))

    def new_levels_parameters(engine):
        return [p for level in engine.problems if type(level) in new.values() for p in level.trainable_parameters()]

    before, after, engine = run_tiny(tmp_path, monkeypatch, cfg, new_levels_parameters, namespace[CALLS])
    assert engine.global_step == cfg.train.iters == 2
    assert changed(before, after), f"training left the parameters of {', '.join(new)} as they were"
    assert namespace[CALLS], "none of the example's code ran while training"


def _method_name(text: str) -> str:
    """The name the example selects (its YAML ``hypergradient.type``), else the one it registers."""
    name = (example_config(text).get("hypergradient") or {}).get("type")
    if name:
        return name
    for block in code_blocks(text, "python"):
        for node in ast.walk(ast.parse(block)):
            if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) == \
                    "register_hypergradient" and node.args and isinstance(node.args[0], ast.Constant):
                return node.args[0].value
    raise AssertionError("the hypergradient example neither selects (YAML) nor registers a named method")


def test_the_hypergradient_method_example_is_called_and_trains_the_codebook(tmp_path, monkeypatch, registries):
    text = hypergradient_section()
    blocks = code_blocks(text, "python")
    namespace = run_snippet(blocks, "the hypergradient example")
    name = _method_name(text)

    data = example_config(text)
    cfg = tiny_config(levels=data.get("levels"), hypergradient={**(data.get("hypergradient") or {}), "type": name})
    assert cfg.hypergradient.type == name

    uppers = {level.name for level in cfg.levels if level.lower}  # the levels a hypergradient trains
    assert uppers, "the hypergradient example's config has no level above another"

    def upper_parameters(engine):
        return [p for level in engine.problems if level.name in uppers for p in level.trainable_parameters()]

    before, after, engine = run_tiny(tmp_path, monkeypatch, cfg, upper_parameters, namespace[CALLS])
    assert namespace[CALLS], f"hypergradient.type: {name} never called the example's function"
    assert len(namespace[CALLS]) >= cfg.train.iters, namespace[CALLS]
    assert changed(before, after), "the upper level did not train"


def test_the_level_examples_params_are_validated_with_the_config(registries):
    text = level_section()
    run_snippet(code_blocks(text, "python"), "Adding a level")
    levels = example_config(text)["levels"]
    (with_params,) = [level for level in levels if level.get("params")]
    (name, value), = with_params["params"].items()
    cfg = tiny_config(levels=levels)
    assert getattr(next(level for level in cfg.levels if level.name == with_params["name"]).params, name) == value
    for params, needle in [({name + "x": value}, f"did you mean '{name}'?"), ({name: -1.0}, "below the minimum")]:
        broken = [dict(level, params=params) if level is with_params else level for level in levels]
        with pytest.raises(mqvae.errors.UserError, match=re.escape(needle)):
            tiny_config(levels=broken)


def test_the_standalone_quantizer_example_runs_and_keeps_its_contract(registries):
    (block,) = code_blocks(sections()["The quantizer as a standalone layer"], "python")
    namespace = run_snippet([block], "the standalone quantizer")
    quantizer, encoder, images, out = (namespace[k] for k in ("quantizer", "encoder", "images", "out"))
    assert int(out.counts.sum()) == out.indices.shape[0]  # the last batch's vectors, each counted once
    # The forward is pure: a forward leaves every parameter and buffer as it was ...
    before = {k: v.clone() for k, v in quantizer.state_dict().items()}
    with torch.no_grad():
        z_e = encoder(images[:8])
        result = quantizer(z_e)
    assert all(torch.equal(before[k], v) for k, v in quantizer.state_dict().items())
    # ... and maintenance is the explicit call: it advances the codes' idle counters (LRU replacement).
    quantizer.maintain(z_e, result.detached())
    assert not torch.equal(before["idle_iters"], quantizer.state_dict()["idle_iters"])
