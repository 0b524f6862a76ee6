"""Who may import whom (design.md's table), checked on the whole package, and no import cycles.

Every ``import`` in ``nextproxy/`` counts: module level, inside functions and under
``TYPE_CHECKING``; relative imports are resolved; ``from pkg import name`` counts as an import
of ``pkg.name`` when that is a module. ``core/`` is checked transitively: whatever it imports
from the package must itself keep to core's rules (so core cannot reach ``asyncio`` through a
helper elsewhere). A parent package's ``__init__`` runs on import but is not followed: core
imports ``nextproxy.config.model``, and the loaders ``nextproxy.config`` also holds are never
called from core. Both checkers are shown to catch planted bad source below.
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "nextproxy"
STDLIB = frozenset(sys.stdlib_module_names)

CORE_STDLIB = frozenset({
    "__future__", "abc", "base64", "binascii", "codecs", "collections", "dataclasses", "datetime",
    "enum", "functools", "hashlib", "hmac", "ipaddress", "itertools", "math", "operator", "re",
    "string", "struct", "typing", "unicodedata", "urllib.parse",
})  # fmt: skip
"""The standard library core may use: no I/O, no clock (datetime only for types: ``now`` is an
argument, and a ``datetime.now()``-style call in core is refused separately). A dotted name allows
that module only (``urllib.parse``, never ``urllib.request``)."""
NEVER_IN_CORE = frozenset({
    "asyncio", "socket", "ssl", "selectors", "time", "subprocess", "logging", "os", "threading",
    "prometheus_client", "uvloop",
})  # fmt: skip
CLOCKS = frozenset({"now", "utcnow", "today"})
CLOCKS_WITHOUT_ARGUMENTS = frozenset({"time", "monotonic", "perf_counter", "time_ns", "monotonic_ns"})
"""``time.time()`` reads a clock; ``builder.time(now)`` (cryptography's verifier) is given one."""


@dataclass(frozen=True)
class Layer:
    name: str
    internal: tuple[str, ...]
    """Modules it may import: each entry and anything below it ("nextproxy" alone: exactly the
    root package, for ``__version__``)."""
    external: frozenset[str] | None
    """Third-party top-level names it may import; stdlib is allowed unless ``stdlib`` says."""
    stdlib: frozenset[str] | None = None
    """If set, the only stdlib modules allowed."""


_FOLDERS = ("errors", "config", "core", "edge", "process", "demo", "cli", "__main__")

LAYERS = {
    "errors": Layer("errors", (), frozenset()),
    "root": Layer("root", (), frozenset()),
    "config": Layer("config", ("nextproxy.config", "nextproxy.errors"), frozenset()),
    # h11 until the strict HTTP/1.1 codec replaces it in core/http1.py (design.md).
    "core": Layer(
        "core", ("nextproxy.core", "nextproxy.errors", "nextproxy.config.model"),
        frozenset({"wsproto", "OpenSSL", "cryptography", "h11"}), CORE_STDLIB,
    ),  # fmt: skip
    "edge": Layer(
        "edge", ("nextproxy.edge", "nextproxy.core", "nextproxy.config", "nextproxy.errors"),
        frozenset({"uvloop", "OpenSSL", "cryptography"}),
    ),  # fmt: skip
    "process": Layer(
        "process", ("nextproxy.process", "nextproxy.edge", "nextproxy.config", "nextproxy.errors", "nextproxy"),
        frozenset({"prometheus_client", "h11", "uvloop"}),
    ),  # fmt: skip
    "demo": Layer(
        "demo", ("nextproxy.demo", "nextproxy.config", "nextproxy.errors"),
        frozenset({"h11", "wsproto", "cryptography"}),
    ),  # fmt: skip
    "cli": Layer("cli", ("nextproxy", *(f"nextproxy.{name}" for name in _FOLDERS)), None),
}


def layer_of(module: str) -> Layer:
    parts = module.split(".")
    if module == "nextproxy":
        return LAYERS["root"]
    name = parts[1]
    if name in ("cli", "__main__"):
        return LAYERS["cli"]
    return LAYERS[name]


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def package_sources(root: Path = PACKAGE) -> dict[str, str]:
    return {module_name(path, root): path.read_text() for path in sorted(root.rglob("*.py"))}


def _is_package(module: str, sources: dict[str, str]) -> bool:
    return any(other.startswith(module + ".") for other in sources)


def imports_of(module: str, source: str, sources: dict[str, str]) -> set[str]:
    """Every module ``module`` imports, relative imports resolved to absolute names."""
    package = module if _is_package(module, sources) else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            submodules = {f"{target}.{alias.name}" for alias in node.names} & set(sources)
            found.update(submodules)
            if len(submodules) < len(node.names):
                found.add(target)  # some names are attributes of ``target`` itself
    return found


def clock_calls(source: str) -> list[str]:
    """``datetime.now()``, ``time.time()``-style calls: core gets its clock as an argument."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            name = node.func.attr
            if name in CLOCKS or (name in CLOCKS_WITHOUT_ARGUMENTS and not node.args):
                found.append(name)
    return found


def _allowed(layer: Layer, target: str) -> str | None:
    """None if ``layer`` may import ``target``, else why not."""
    if target == "nextproxy" or target.startswith("nextproxy."):
        if any(target == prefix or (prefix != "nextproxy" and target.startswith(prefix + ".")) for prefix in layer.internal):
            return None
        return f"{layer.name} may not import {target}"
    top = target.split(".")[0]
    if top in STDLIB:
        if layer.stdlib is not None and (
            not (top in layer.stdlib or target in layer.stdlib) or top in NEVER_IN_CORE
        ):
            return f"{layer.name} may not import the standard library's {target} (I/O or a clock)"
        return None
    if layer.external is None or top in layer.external:
        return None
    return f"{layer.name} may not import {target}"


def violations(sources: dict[str, str]) -> list[str]:
    """Every import that breaks the table, as 'module: reason'."""
    graph = {module: imports_of(module, source, sources) for module, source in sources.items()}
    found = []
    for module, targets in graph.items():
        layer = layer_of(module)
        for target in sorted(targets):
            reason = _allowed(layer, target)
            if reason:
                found.append(f"{module}: {reason}")
    for start in (m for m in graph if layer_of(m).name == "core"):
        seen, todo = {start}, [start]
        while todo:  # core's rules hold for everything core reaches inside the package
            current = todo.pop()
            for target in sorted(graph.get(current, ())):
                reason = _allowed(LAYERS["core"], target)
                if reason and current != start:
                    found.append(f"{start} (through {current}): {reason}")
                if target in graph and target not in seen:
                    seen.add(target)
                    todo.append(target)
            if layer_of(current).name == "core" or current == "nextproxy.config.model":
                found += [f"{current}: core may not read a clock ({call}())" for call in clock_calls(sources[current])]
    return sorted(set(found))


def cycles(sources: dict[str, str]) -> list[list[str]]:
    """The package's import cycles (strongly connected components of more than one module,
    or a module importing itself), by Tarjan's algorithm."""
    graph = {m: sorted(t for t in imports_of(m, s, sources) if t in sources) for m, s in sources.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph[node]:
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return found


# ---------------------------------------------------------------------------- the package itself


def test_every_import_keeps_to_the_layer_table() -> None:
    sources = package_sources()
    assert {layer_of(m).name for m in sources} == set(LAYERS)  # every folder is classified
    assert violations(sources) == []


def test_the_package_has_no_import_cycle() -> None:
    assert cycles(package_sources()) == []


# ---------------------------------------------------------------------------- planted violations


def _planted(**changes: str) -> dict[str, str]:
    """The real package with some modules' source replaced or added (dots as double underscores)."""
    sources = package_sources()
    for name, source in changes.items():
        sources[name.replace("__", ".")] = source
    return sources


@pytest.mark.parametrize(
    "module, source, expected",
    [
        ("nextproxy__core__routing", "import asyncio\n", "nextproxy.core.routing: core may not import the standard library's asyncio"),
        ("nextproxy__core__routing", "def f():\n    import time\n", "core may not import the standard library's time"),
        ("nextproxy__core__routing", "from urllib.request import urlopen\n", "core may not import the standard library's urllib.request"),
        ("nextproxy__core__routing", "from ..edge import connection\n", "core may not import nextproxy.edge.connection"),
        ("nextproxy__core__routing", "from nextproxy.config import toml\n", "core may not import nextproxy.config.toml"),
        ("nextproxy__core__routing", "import datetime\nx = datetime.datetime.now()\n", "core may not read a clock (now())"),
        ("nextproxy__core__tls", "import subprocess\n", "core may not import the standard library's subprocess"),
        ("nextproxy__edge__listener", "from nextproxy.process import metrics\n", "edge may not import nextproxy.process.metrics"),
        ("nextproxy__edge__accept", "from ..demo import pki\n", "edge may not import nextproxy.demo.pki"),
        ("nextproxy__edge__accept", "import prometheus_client\n", "edge may not import prometheus_client"),
        ("nextproxy__process__admin", "from nextproxy.core.routing import RouteTable\n", "process may not import nextproxy.core.routing"),
        ("nextproxy__process__admin", "from nextproxy.demo import standins\n", "process may not import nextproxy.demo.standins"),
        ("nextproxy__demo__wsclient", "from nextproxy.edge import upstream\n", "demo may not import nextproxy.edge.upstream"),
        ("nextproxy__config__values", "from nextproxy.core import routing\n", "config may not import nextproxy.core.routing"),
        ("nextproxy__errors", "import nextproxy.config\n", "errors may not import nextproxy.config"),
    ],
)
def test_a_planted_import_is_named(module: str, source: str, expected: str) -> None:
    found = violations(_planted(**{module: source}))
    assert any(expected in line for line in found), found


def test_core_is_checked_through_what_it_imports() -> None:
    """A core module reaching ``socket`` through a new helper elsewhere in the package is caught,
    though the helper's own layer (config) may use the standard library freely."""
    found = violations(_planted(
        nextproxy__config__helper="import socket\n",
        nextproxy__core__routing="from nextproxy.config.model import Config\nfrom nextproxy.config import helper\n",
    ))  # fmt: skip
    assert "nextproxy.core.routing: core may not import nextproxy.config.helper" in found
    assert any("through nextproxy.config.helper" in line and "socket" in line for line in found), found


def test_a_planted_cycle_is_found_with_relative_imports() -> None:
    found = cycles(_planted(
        nextproxy__edge__deadline="from . import phases\n",
        nextproxy__edge__phases="from .deadline import Timer\n",
    ))  # fmt: skip
    assert ["nextproxy.edge.deadline", "nextproxy.edge.phases"] in found


def test_a_longer_cycle_and_a_self_import_are_found() -> None:
    found = cycles(_planted(
        nextproxy__config__values="from nextproxy.config import preset\n",
        nextproxy__config__preset="from nextproxy.config.toml import from_toml\n",
        nextproxy__config__toml="from .values import parse_bool\n",
        nextproxy__demo__channels="import nextproxy.demo.channels\n",
    ))  # fmt: skip
    assert ["nextproxy.config.preset", "nextproxy.config.toml", "nextproxy.config.values"] in found
    assert ["nextproxy.demo.channels"] in found
