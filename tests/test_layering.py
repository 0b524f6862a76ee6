"""The core stays sans-IO: it imports nothing that does I/O, keeps time or logs."""

from __future__ import annotations

import ast
from pathlib import Path

CORE = Path(__file__).resolve().parent.parent / "nextproxy" / "core"
FORBIDDEN = {"asyncio", "socket", "selectors", "time", "logging", "prometheus_client", "uvloop", "threading", "os"}
ALLOWED_NEXTPROXY = ("nextproxy.core", "nextproxy.config", "nextproxy.errors")  # config_* too


def imports(path: Path) -> list[str]:
    names: list[str] = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
    return names


def test_core_imports_nothing_it_must_not() -> None:
    files = sorted(CORE.glob("*.py"))
    assert len(files) >= 7, files  # actions, clienthello, headers, http1, routing, tls, websocket
    for path in files:
        for name in imports(path):
            top = name.split(".")[0]
            assert top not in FORBIDDEN, f"{path.name} imports {name}"
            if top == "nextproxy":
                assert name.startswith(ALLOWED_NEXTPROXY), f"{path.name} imports {name}"


def test_config_and_errors_stay_below_the_core() -> None:
    root = CORE.parent
    for name in imports(root / "errors.py"):
        assert not name.startswith("nextproxy"), name
    for path in sorted(root.glob("config*.py")):
        for name in imports(path):
            assert name.split(".")[0] not in ("ssl", "asyncio", "socket", "OpenSSL"), (path.name, name)
            assert not name.startswith("nextproxy") or name.startswith(("nextproxy.errors", "nextproxy.config")), (path.name, name)
