"""The wiring as the source shows it: every service built in one place and never assigned later,
routes that take services rather than the runtime, and no import cycle in `gateway/`."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

from gateway.config import Settings
from gateway.runtime import Gateway
from gateway.services import Services

PACKAGE = Path(__file__).resolve().parents[2] / "gateway"
ROOTS = [PACKAGE / "runtime.py", PACKAGE / "services.py"]  # the composition root and the lifecycle

# Cycles someone else is removing, each named with its owner. Lead: delete an entry once its fix is merged.
KNOWN_CYCLES: list[set[str]] = []  # none left


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def _self_assignments(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> list[str]:
    """`self.X` targets of assignments (plain, annotated, augmented, tuple) in `fn`."""
    found = []
    for node in ast.walk(fn):
        targets: list[ast.expr] = []
        if isinstance(node, ast.Assign):
            targets = list(node.targets)
        elif isinstance(node, ast.AnnAssign | ast.AugAssign):
            targets = [node.target]
        for target in targets:
            for t in ast.walk(target):
                if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self":
                    found.append(f"{fn.name}: self.{t.attr} (line {t.lineno})")
    return found


@pytest.mark.parametrize("path", ROOTS, ids=lambda p: p.name)
def test_the_runtime_assigns_its_attributes_in_its_constructor_only(path: Path) -> None:
    late = []
    for cls in [n for n in ast.walk(_tree(path)) if isinstance(n, ast.ClassDef)]:
        for fn in cls.body:
            if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef) and fn.name != "__init__":
                late += _self_assignments(fn)
    assert late == []


@pytest.mark.parametrize("path", ROOTS, ids=lambda p: p.name)
def test_the_runtime_never_asks_whether_a_service_exists(path: Path) -> None:
    """No `getattr(obj, name, default)` and no `setattr`: a service is there from construction."""
    calls = [n for n in ast.walk(_tree(path)) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)]
    assert [c.lineno for c in calls if c.func.id == "getattr" and len(c.args) > 2] == []  # type: ignore[attr-defined]
    assert [c.lineno for c in calls if c.func.id == "setattr"] == []  # type: ignore[attr-defined]


def test_routes_take_services_not_the_runtime() -> None:
    """`api/` imports no runtime and no route takes it: each names the services it uses."""
    for path in sorted((PACKAGE / "api").glob("*.py")):
        assert "gateway.runtime" not in _imports_of("gateway.api." + path.stem, path), path.name
        for fn in ast.walk(_tree(path)):
            if isinstance(fn, ast.AsyncFunctionDef):
                assert "gw" not in [a.arg for a in fn.args.args], f"{path.name}: {fn.name}"


def test_services_exist_from_construction_and_are_never_replaced(tmp_path: Path) -> None:
    settings = Settings()
    settings.data.dir = str(tmp_path / "data")
    svc = Gateway(settings).services
    assert isinstance(svc, Services)
    optional = {"forward_cache", "cloud", "forwarder", "retention"}  # forwarding on (cloud.url) only
    for field in dataclasses.fields(svc):
        if field.name not in optional:
            assert getattr(svc, field.name) is not None, field.name
    with pytest.raises(dataclasses.FrozenInstanceError):
        svc.catalog = svc.catalog  # type: ignore[misc]


def test_forwarding_services_are_built_with_a_cloud_url(tmp_path: Path) -> None:
    settings = Settings()
    settings.data.dir = str(tmp_path / "data")
    settings.storage.backend = "folder"
    settings.cloud.url = "http://127.0.0.1:9/api"
    svc = Gateway(settings).services
    assert svc.cloud is not None and svc.forwarder is not None
    assert svc.forwarder.client is svc.cloud and svc.keycheck.client is svc.cloud
    assert svc.catalog.on_applied is not None  # entries reaching DuckDB wake the forwarder


# -- the import graph ------------------------------------------------------------------------------


def _modules() -> dict[str, Path]:
    mods = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        mods[".".join(parts)] = path
    return mods


def _type_checking_only(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports_of(name: str, path: Path, known: dict[str, Path] | None = None) -> set[str]:
    """Modules of `gateway` that `name` imports anywhere (functions included), except under
    `if TYPE_CHECKING:`; `from pkg import mod` counts `pkg` and `pkg.mod`."""
    known = known if known is not None else _modules()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _type_checking_only(child):
                for other in child.orelse:
                    visit_node(other)
                continue
            visit_node(child)

    def visit_node(node: ast.AST) -> None:
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{a.name}" for a in node.names)
        visit(node)

    visit(_tree(path))
    return {m for m in found if m in known and m != name}


def _cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[set[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(component)

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return found


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [{"a", "b", "c"}]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_gateway_has_no_import_cycle() -> None:
    mods = _modules()
    graph = {name: _imports_of(name, path, mods) for name, path in mods.items()}
    assert "gateway.services" in graph["gateway.runtime"]  # the graph sees imports at all
    unexpected = [sorted(c) for c in _cycles(graph) if not any(c <= known for known in KNOWN_CYCLES)]
    assert unexpected == []


def test_every_service_a_route_takes_passes_litestars_check_unchanged(tmp_path: Path) -> None:
    """Litestar checks dependencies against their annotations (a failure is a 500); each must pass as is."""
    import typing

    import msgspec
    from litestar.params import DependencyKwarg

    from gateway.app import create_app

    settings = Settings()
    settings.data.dir = str(tmp_path / "data")
    settings.storage.backend = "folder"
    gw = Gateway(settings)
    svc = gw.services
    names = {f.name for f in dataclasses.fields(svc)}
    checked = 0
    for route in create_app(settings, gw, offline=True).routes:
        for handler in route.route_handlers:  # type: ignore[union-attr]
            if not handler.fn.__module__.startswith("gateway.api"):
                continue  # the framework's own (the OpenAPI schema)
            hints = typing.get_type_hints(handler.fn, include_extras=True)
            for name in names & set(hints):
                hint = hints[name]
                if typing.get_origin(hint) is typing.Annotated and any(
                        isinstance(m, DependencyKwarg) and m.skip_validation for m in hint.__metadata__):
                    continue
                model = msgspec.defstruct("Model", [(name, hint)])
                value = getattr(svc, name)
                assert getattr(msgspec.convert({name: value}, model, strict=False), name) is value, name
                checked += 1
    assert checked > 20
