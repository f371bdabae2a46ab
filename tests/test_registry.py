"""One place per layer type and per framework: the tables elsewhere derive from the spec classes and BACKENDS."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from cnnrun.backends import BACKENDS
from cnnrun.spec import compile_model

ROOT = Path(__file__).resolve().parents[1]
# version.py names the framework packages without importing BACKENDS (that import costs --version more than the
# rest; tests/test_cli.py keeps the two equal). The equivalence worker's NATIVE_COUNTS holds code that looks into
# each framework's own objects, not facts; tests/backends/test_equivalence.py fails for a framework without one.
# The distributed tests' case tables are per engine module (a spec and options for each); tests/distributed/
# test_seam.py fails when an engine of BACKENDS has no cases there.
HAND_WRITTEN = {"cnnrun/version.py", "tests/backends/equivalence_worker.py", "tests/distributed/trainer_worker.py",
                "tests/distributed/test_tensorflow_chainer.py"}


def _framework_tables(path: Path):
    """Literal lists, tuples, sets and dict keys in ``path`` that name three or more frameworks."""
    names, text = set(BACKENDS), path.read_text()
    if sum(f'"{name}"' in text for name in names) < 3:  # cheap: most files name no three frameworks at all
        return
    for node in ast.walk(ast.parse(text, str(path))):
        items = node.keys if isinstance(node, ast.Dict) else getattr(node, "elts", None)
        if not isinstance(node, (ast.Dict, ast.List, ast.Tuple, ast.Set)) or items is None:
            continue
        named = {item.value for item in items if isinstance(item, ast.Constant) and item.value in names}
        if len(named) >= 3:
            yield node.lineno, sorted(named)


def test_no_table_lists_the_frameworks_by_hand():
    """A per-framework table written out by hand would leave a new framework out, or fail on it with a KeyError;
    such facts live on the framework's BackendInfo and tables iterate BACKENDS."""
    found = []
    for path in sorted([*ROOT.glob("cnnrun/**/*.py"), *ROOT.glob("tests/**/*.py")]):
        relative = path.relative_to(ROOT).as_posix()
        if relative in HAND_WRITTEN or relative == "cnnrun/backends/__init__.py":
            continue
        found += [f"{relative}:{line} {named}" for line, named in _framework_tables(path)]
    assert not found, "per-framework tables outside cnnrun.backends.BACKENDS:\n" + "\n".join(found)


def test_every_framework_states_what_the_tests_read():
    for name, info in BACKENDS.items():
        assert info.layout in ("channels_first", "channels_last"), name
        assert info.package in info.imports and set(info.requirements) >= {info.package}, name
        for options in (*info.engines, *info.fast_paths.values()):
            info.options.model_validate(options)  # every engine and fast path is a valid option set
            assert set(info.engine_packages(options)) <= info.imports or options.get("backend"), (name, options)


def test_a_builder_must_return_exactly_the_tensors_its_spec_declares():
    from cnnrun.backends.building import BuildContext, Built

    model = compile_model({"name": "probe", "layers": [{"type": "conv2d", "filters": 2, "kernel": 1},
                                                       {"type": "global_avgpool"}, {"type": "dense", "units": 3}]},
                          (1, 4, 4), 3)
    conv, pool, dense = model.layers
    builders = {"conv2d": lambda layer, ctx: Built("conv", {"kernel": "k"}),  # forgets the bias
                "global_avgpool": lambda layer, ctx: Built("pool"),
                "dense": lambda layer, ctx: Built("dense", {"kernel": "k", "bias": "b"})}
    ctx = BuildContext(builders)
    assert [ctx.build(pool), ctx.build(dense)] == ["pool", "dense"]
    assert ctx.tensors == {"dense_2/kernel": "k", "dense_2/bias": "b"} and ctx.trainable == list(ctx.tensors)
    with pytest.raises(RuntimeError, match=r"conv2d builder of conv2d_0 returned tensors \['kernel'\]; its spec "
                                           r"declares \['bias', 'kernel'\]"):
        ctx.build(conv)


def _builders_keys(module: str):
    """The keys of the ``BUILDERS`` table of ``module``, read from its source (no framework is imported)."""
    tree = ast.parse((ROOT / (module.replace(".", "/") + ".py")).read_text())
    for node in ast.walk(tree):
        targets = getattr(node, "targets", None) or [getattr(node, "target", None)]
        if any(isinstance(t, ast.Name) and t.id == "BUILDERS" for t in targets) and isinstance(node.value, ast.Dict):
            return {key.value for key in node.value.keys}
    raise AssertionError(f"{module} has no BUILDERS table")


@pytest.mark.parametrize("module", [info.module for info in BACKENDS.values()] + ["cnnrun.export.onnx"])
def test_every_backend_builds_every_layer_type(module):
    from cnnrun.spec import LAYER_TYPES

    assert _builders_keys(module) == set(LAYER_TYPES)
