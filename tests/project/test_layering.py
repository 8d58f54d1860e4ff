"""Imports point down only (docs/architecture.md), read from the source with ``ast``.

* the package DAG: ``trustcore`` imports nothing of ours; ``signers`` and ``broker_config``
  only ``trustcore``; the components (``hq``, ``factory_station``, ``registrar``) the core,
  ``signers`` and ``broker_config``; the device side (``device_sim``) the core and
  ``signers`` — except the factory line (:data:`FACTORY_LINE`), the two simulator modules
  that hand devices to a real station and may use the station's provisioning API;
* no import cycle between the modules of one package (function-local and
  ``TYPE_CHECKING`` imports count: a lazy import hides a cycle, it does not remove it);
* no private name (``_x``) imported from another module, or read off an imported module,
  in the packages, ``bench/`` or ``scripts/`` (tests may look inside what they test).

Every import statement counts, wherever it stands. The checks run on the real tree and,
first, on small trees built here that break each rule, so a checker that finds nothing
cannot pass unnoticed.
"""

from __future__ import annotations

import ast
import functools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

#: Each package of ours and the packages it may import (besides itself).
ALLOWED: dict[str, frozenset[str]] = {
    "trustcore": frozenset(),
    "signers": frozenset({"trustcore"}),
    "broker_config": frozenset({"trustcore"}),
    "hq": frozenset({"trustcore", "signers", "broker_config"}),
    "factory_station": frozenset({"trustcore", "signers", "broker_config"}),
    "registrar": frozenset({"trustcore", "signers", "broker_config"}),
    "device_sim": frozenset({"trustcore", "signers"}),
}
PACKAGES = tuple(ALLOWED)
#: Not packages (nothing imports them), checked for private reach-ins only.
TOOLS = ("bench", "scripts")

#: The factory line: where simulated devices meet a real station (``device-sim provision``
#: and ``build-fleet``). Only these modules of ``device_sim`` may import ``factory_station``,
#: and only its provisioning API.
FACTORY_LINE = frozenset({"device_sim.cli", "device_sim.fleet_build"})
STATION_API = frozenset(
    {"factory_station.errors", "factory_station.provision", "factory_station.station"}
)


@dataclass(frozen=True)
class Import:
    module: str  # the importing module
    target: str  # the module imported (a submodule when ``from pkg import submodule``)
    names: tuple[str, ...]  # names taken with ``from target import ...``
    line: int


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules_of(root: Path, tops: Iterable[str]) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for top in tops:
        for path in sorted((root / top).rglob("*.py")):
            found[module_name(root, path)] = path
    return found


@functools.cache
def parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), str(path))


@functools.cache
def nodes(path: Path) -> tuple[ast.AST, ...]:
    return tuple(ast.walk(parse(path)))


def imports_of(name: str, path: Path, known: set[str]) -> Iterator[Import]:
    """Every import statement of the module (anywhere in it), resolved to module names."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in nodes(path):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(name, alias.name, (), node.lineno)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            plain = tuple(a.name for a in node.names)
            submodules = [f"{target}.{n}" for n in plain if f"{target}.{n}" in known]
            rest = tuple(n for n in plain if f"{target}.{n}" not in known)
            for sub in submodules:
                yield Import(name, sub, (), node.lineno)
            if rest or not submodules:
                yield Import(name, target, rest, node.lineno)


def all_imports(root: Path, tops: Iterable[str]) -> list[Import]:
    mods = modules_of(root, tops)
    known = set(mods)
    return [imp for name, path in mods.items() for imp in imports_of(name, path, known)]


def top(module: str) -> str:
    return module.split(".", 1)[0]


def dag_violations(imports: Iterable[Import]) -> list[str]:
    bad = []
    for imp in imports:
        src, dst = top(imp.module), top(imp.target)
        if src not in ALLOWED or dst not in ALLOWED or src == dst or dst in ALLOWED[src]:
            continue
        if imp.module in FACTORY_LINE and imp.target in STATION_API:
            continue
        bad.append(f"{imp.module}:{imp.line} imports {imp.target} ({src} may not use {dst})")
    return bad


def cycles(imports: Iterable[Import]) -> list[list[str]]:
    """Strongly connected components (more than one module, or a module importing itself)
    of the import graph restricted to each package (Tarjan)."""
    graph: dict[str, set[str]] = {}
    for imp in imports:
        graph.setdefault(imp.module, set())
        if top(imp.module) == top(imp.target):
            graph[imp.module].add(imp.target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph.get(v, ()):
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def imp_modules(imports: Iterable[Import]) -> set[str]:
    return {imp.module for imp in imports}


def private_reach_ins(root: Path, tops: Iterable[str]) -> list[str]:
    """``from ours import _x`` across modules, and ``mod._x`` on a module of ours that was
    bound with ``import``."""
    mods = modules_of(root, tops)
    known = set(mods) | set(modules_of(root, PACKAGES))
    bad = []
    for name, path in mods.items():
        for imp in imports_of(name, path, known):
            if top(imp.target) not in ALLOWED and top(imp.target) not in TOOLS:
                continue
            for n in imp.names:
                if n.startswith("_") and not n.startswith("__") and imp.target != name:
                    bad.append(f"{name}:{imp.line} imports {imp.target}.{n}")
        bound: dict[str, str] = {}
        for node in nodes(path):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.asname and top(alias.name) in ALLOWED:
                        bound[alias.asname] = alias.name
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    if full in known:
                        bound[alias.asname or alias.name] = full
        for node in nodes(path):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in bound
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
            ):
                bad.append(f"{name}:{node.lineno} reads {bound[node.value.id]}.{node.attr}")
    return bad


# ---------------------------------------------------------------- the checker can fail


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for pkg in PACKAGES:
        (tmp_path / pkg).mkdir(exist_ok=True)
        (tmp_path / pkg / "__init__.py").touch()
    return tmp_path


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({"trustcore/a.py": "import signers.tpm\n", "signers/tpm.py": ""}, "trustcore.a:1"),
        (
            {"device_sim/d.py": "def f():\n    from registrar.broker import Endpoint\n"},
            "device_sim.d:2 imports registrar.broker",
        ),
        (  # the factory line may use the station's API, nothing else of it
            {"device_sim/cli.py": "from factory_station.store import StationStore\n"},
            "device_sim.cli:1 imports factory_station.store",
        ),
        (
            {
                "factory_station/cli.py": "from device_sim import device\n",
                "device_sim/device.py": "",
            },
            "factory_station.cli:1 imports device_sim.device",
        ),
    ],
)
def test_checker_finds_a_wrong_way_import(
    tmp_path: Path, files: dict[str, str], expected: str
) -> None:
    root = _tree(tmp_path, files)
    found = dag_violations(all_imports(root, PACKAGES))
    assert any(v.startswith(expected) for v in found), found


def test_checker_allows_the_factory_line(tmp_path: Path) -> None:
    root = _tree(
        tmp_path,
        {
            "device_sim/fleet_build.py": "from factory_station.provision import provision_batch\n",
            "factory_station/provision.py": "",
        },
    )
    assert dag_violations(all_imports(root, PACKAGES)) == []


def test_checker_finds_a_lazy_cycle(tmp_path: Path) -> None:
    root = _tree(
        tmp_path,
        {
            "registrar/site.py": "def f():\n    from registrar.revocation import lock\n",
            "registrar/revocation.py": "from registrar.site import SiteHome\n",
            "registrar/other.py": "from registrar.site import SiteHome\n",
        },
    )
    assert cycles(all_imports(root, PACKAGES)) == [["registrar.revocation", "registrar.site"]]


def test_checker_finds_private_reach_ins(tmp_path: Path) -> None:
    root = _tree(
        tmp_path,
        {
            "hq/ingest.py": "def _persist(): ...\n",
            "bench/audit.py": "from hq.ingest import _persist\nimport hq.ingest as ing\n"
            "ing._persist()\n",
            "hq/ok.py": "from hq.ingest import __all__\n",
        },
    )
    found = private_reach_ins(root, (*PACKAGES, "bench"))
    assert found == [
        "bench.audit:1 imports hq.ingest._persist",
        "bench.audit:3 reads hq.ingest._persist",
    ]


# ------------------------------------------------------------------------ the real tree


@pytest.fixture(scope="module")
def imports() -> list[Import]:
    found = all_imports(ROOT, PACKAGES)
    assert len(imp_modules(found)) > 100  # the walk saw the packages (124 modules)
    return found


def test_packages_import_down_only(imports: list[Import]) -> None:
    assert dag_violations(imports) == []


def test_the_factory_line_is_where_station_and_simulator_meet(imports: list[Import]) -> None:
    """``factory_station`` never imports the simulator; the simulator reaches the station
    only from the factory-line modules (and does, so the exception is still needed)."""
    station_users = {i.module for i in imports if top(i.module) == "device_sim"} & {
        i.module for i in imports if top(i.target) == "factory_station"
    }
    assert station_users <= FACTORY_LINE
    assert station_users, "no factory-line module imports the station: drop the exception"


def test_no_import_cycles_within_a_package(imports: list[Import]) -> None:
    assert cycles(imports) == []


def test_no_private_names_across_modules() -> None:
    assert private_reach_ins(ROOT, (*PACKAGES, *TOOLS)) == []
