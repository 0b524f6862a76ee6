"""The README's ``python -m ...`` commands name modules that exist (they moved in the layout)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def test_every_python_dash_m_module_in_the_readme_exists() -> None:
    modules = set(re.findall(r"python -m ([\w.]+)", README.read_text()))
    assert "nextproxy.demo.wsclient" in modules
    missing = sorted(m for m in modules if m.startswith("nextproxy") and importlib.util.find_spec(m) is None)
    assert missing == []
