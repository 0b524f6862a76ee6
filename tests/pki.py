"""The TLS tests' certificate set, minted by the demo's minter (``nextproxy.demo.pki``).

``make_test_pki()`` returns a CA, an intermediate, server leaves, client certificates issued by
the CA (directly and through the intermediate), a self-signed client certificate nobody trusts,
an expired CA-issued client certificate and a second, unrelated CA with its own server leaf.
Everything lives in memory; ``TestPki.write()`` puts the files on disk when a test needs paths.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path

from nextproxy.demo.pki import DAY, Issued, make_ca, make_leaf

__all__ = ["DAY", "Issued", "TestPki", "make_ca", "make_leaf", "make_test_pki"]


@dataclass(frozen=True)
class TestPki:
    ca: Issued
    intermediate: Issued
    server: Issued
    """Leaf for localhost, example.com and *.example.com, issued by ``ca``."""
    client: Issued
    """Client certificate issued by ``ca``, with a DNS and a URI SAN."""
    client_via_intermediate: Issued
    """Client certificate issued by ``intermediate``."""
    unknown_client: Issued
    """Self-signed client certificate: no configured CA knows it."""
    expired_client: Issued
    """Issued by ``ca``, expired yesterday."""
    other_ca: Issued
    other_server: Issued
    """Leaf for localhost issued by ``other_ca``."""

    __test__ = False  # not a pytest test class despite the name

    def write(self, folder: Path) -> dict[str, Path]:
        """Write every certificate and key as ``<name>.crt`` / ``<name>.key``; return the paths."""
        paths: dict[str, Path] = {}
        for field_name in self.__dataclass_fields__:
            issued: Issued = getattr(self, field_name)
            for suffix, data in (("crt", issued.cert_pem), ("key", issued.key_pem)):
                path = folder / f"{field_name}.{suffix}"
                path.write_bytes(data)
                path.chmod(0o600)
                paths[f"{field_name}.{suffix}"] = path
        return paths


def make_test_pki() -> TestPki:
    now = datetime.datetime.now(datetime.timezone.utc)
    ca = make_ca("nextproxy test CA")
    intermediate = make_ca("nextproxy test intermediate", ca)
    other_ca = make_ca("unrelated CA")
    return TestPki(
        ca=ca,
        intermediate=intermediate,
        server=make_leaf(ca, "localhost", dns=("localhost", "example.com", "*.example.com")),
        client=make_leaf(ca, "client one", dns=("client.example.net",), uris=("spiffe://test/client",), client=True),
        client_via_intermediate=make_leaf(intermediate, "client two", dns=("two.example.net",), client=True),
        unknown_client=make_leaf(None, "stranger", dns=("stranger.example.net",), client=True),
        expired_client=make_leaf(ca, "expired client", client=True, not_before=now - 30 * DAY, not_after=now - DAY),
        other_ca=other_ca,
        other_server=make_leaf(other_ca, "localhost", dns=("localhost",)),
    )
