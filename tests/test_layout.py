"""The package's layers: imports go one way, the numeric core stands alone, and the settings a model decides
are described once (every place that names them agrees with ``core.settings.MODEL_SETTINGS``)."""
from __future__ import annotations

import ast
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from dnnad.cli import parser
from dnnad.config import JobConfig, SourceConfig
from dnnad.core.dn2 import FitParams
from dnnad.core.estimator import DN2
from dnnad.core.model import ModelMeta
from dnnad.core.settings import FIT_SETTINGS, MODEL_SETTINGS
from tests.helpers import ROOT

pytestmark = pytest.mark.unit
PACKAGE = ROOT / "dnnad"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, set[str]]:
    """Every dnnad module and the dnnad modules it imports, at module level or inside functions."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                edges |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([node.module] if node.module else []))
                for a in node.names:  # `from pkg import module` imports the module, else the package
                    edges.add(f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base)
        graph[name] = {e for e in edges if e in modules and e != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v), on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle_anywhere_in_the_package():
    graph = imports()
    assert len(graph) > 30 and "dnnad.core.settings" in graph["dnnad.config"]
    assert cycles(graph) == []


def test_the_numeric_core_imports_nothing_above_it():
    for name, edges in imports().items():
        if name.startswith("dnnad.core"):
            assert all(e.startswith("dnnad.core") or e == "dnnad.storage" for e in edges), (name, edges)
    for path in (PACKAGE / "core").glob("*.py"):
        tree = ast.parse(path.read_text())
        top = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        top |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert not top & {"ray", "torch", "torchvision", "timm"}, path


def test_the_embedding_side_and_the_cli_load_no_faiss():
    code = ("import sys, dnnad.vision.backbones, dnnad.vision.decode, dnnad.cli, dnnad.sources; "
            "print(sorted(m for m in ('faiss', 'ray') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_every_model_setting_is_described_once_and_everywhere():
    fit_fields = {f.name for f in dataclasses.fields(FitParams)} - {"extra_neighbours"}
    assert {s.fit for s in FIT_SETTINGS} == fit_fields  # a FitParams field without a setting is dropped by the job
    assert fit_fields == set(DN2().get_params()) - {"novelty"}  # the estimator's parameters are the fit's
    meta_fields = {f.name for f in dataclasses.fields(ModelMeta)}
    cfg = JobConfig("score", "out", normal=SourceConfig("n"), query=SourceConfig("q"))
    options = {a.dest: a.option_strings for sub in parser()._subparsers._group_actions[0].choices.values()
               for a in sub._actions}
    assert len({s.flag for s in MODEL_SETTINGS}) == len(MODEL_SETTINGS)
    for s in MODEL_SETTINGS:
        assert s.meta is None or s.meta in meta_fields, s
        s.get(cfg)  # the JobConfig path resolves
        assert s.flag in options.get(s.dest, ()), s
