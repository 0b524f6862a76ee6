"""Shared fixtures: one throwaway PKI per session (made with cryptography at test time)."""

from __future__ import annotations

from pathlib import Path

import pytest

from nextproxy.demo.pki import DemoPki, make_pki


@pytest.fixture(scope="session")
def pki() -> DemoPki:
    return make_pki()


@pytest.fixture(scope="session")
def pki_files(pki: DemoPki, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return pki.write(tmp_path_factory.mktemp("pki"))
