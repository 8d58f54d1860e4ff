"""One exception tree per package: every exception class a package defines, in any of its
modules, derives from that package's root (itself under the shared
``trustcore.errors.ReasonedError``), and the tree drawn in the package's ``errors.py``
docstring names it under its real parent. A class added without drawing it, or drawn under
the wrong parent, fails here."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
from types import ModuleType

import click
import pytest

from trustcore.errors import ReasonedError

#: package -> the root every exception it defines derives from.
ROOTS = {
    "trustcore": "TrustCoreError",
    "signers": "SignerError",
    "device_sim": "DeviceSimError",
    "hq": "HqError",
    "factory_station": "FactoryStationError",
    "registrar": "RegistrarError",
}

_BRANCH = re.compile(r"(├── |└── )(\w+)")


def _modules(package: str) -> list[ModuleType]:
    pkg = importlib.import_module(package)
    names = [package] + [m.name for m in pkgutil.walk_packages(pkg.__path__, f"{package}.")]
    return [importlib.import_module(name) for name in names]


def _exceptions(package: str) -> dict[str, type[BaseException]]:
    """Exception classes defined in ``package`` (not imported into it), by name. A click
    exception is how a command line exits with a code, not an error the package raises."""
    found: dict[str, type[BaseException]] = {}
    for module in _modules(package):
        for name, obj in vars(module).items():
            if (
                inspect.isclass(obj)
                and issubclass(obj, BaseException)
                and obj.__module__ == module.__name__
                and not issubclass(obj, click.ClickException)
            ):
                assert name not in found, f"{package}: {name} defined twice"
                found[name] = obj
    return found


def _drawn_tree(package: str) -> dict[str, str | None]:
    """class name -> parent name, as drawn in ``PACKAGE/errors.py``'s docstring."""
    doc = importlib.import_module(f"{package}.errors").__doc__ or ""
    block = doc.split("::\n", 1)[1]
    parents: dict[str, str | None] = {}
    stack: list[tuple[int, str]] = []  # (column of the name, name)
    for line in block.splitlines():
        if not line.strip():
            if parents:
                break  # the tree ends at its first blank line
            continue
        branch = _BRANCH.search(line)
        if branch is None:
            if not parents:  # the root line
                name = line.split()[0]
                parents[name] = None
                stack = [(len(line) - len(line.lstrip()), name)]
            continue  # a description continued on its own line
        column = branch.start(2)
        name = branch.group(2)
        while stack and stack[-1][0] >= column:
            stack.pop()
        assert stack, f"{package}: {name} drawn without a parent"
        parents[name] = stack[-1][1]
        stack.append((column, name))
    return parents


@pytest.mark.parametrize("package", sorted(ROOTS))
def test_every_exception_is_under_the_package_root_and_drawn(package: str) -> None:
    classes = _exceptions(package)
    root = classes[ROOTS[package]]
    assert issubclass(root, ReasonedError)
    drawn = _drawn_tree(package)
    for name, cls in classes.items():
        if cls is ReasonedError:
            continue  # the shared base, drawn above trustcore's root
        assert issubclass(cls, root), f"{cls.__module__}.{name} is not under {root.__name__}"
        assert name in drawn, f"{cls.__module__}.{name} is missing from {package}/errors.py"
        base = cls.__bases__[0].__name__
        if name != root.__name__:
            assert drawn[name] == base, f"{name} drawn under {drawn[name]}, derives from {base}"
    assert set(drawn) - set(classes) == set(), "the tree draws classes that do not exist"


def test_the_shared_base_tops_the_core_tree() -> None:
    assert _drawn_tree("trustcore")["TrustCoreError"] == "ReasonedError"


def test_broker_config_raises_only_core_errors() -> None:
    """``broker_config`` is pure rendering: it raises the core's ``InvalidValueError`` and
    defines no exception of its own."""
    assert _exceptions("broker_config") == {}


def test_no_error_name_means_two_things() -> None:
    """One name, one class across the project, except each component's own store errors
    (``hq.errors.StoreError``, ``registrar.errors.StoreError``: each component's store)."""
    seen: dict[str, str] = {}
    shared = {"StoreError", "StoreConflict"}
    for package in ROOTS:
        for name, cls in _exceptions(package).items():
            if name in shared:
                continue
            assert name not in seen, f"{name}: {seen[name]} and {cls.__module__}"
            seen[name] = cls.__module__
