"""RouteTable: SNI classes and the path policy, as tables."""

from __future__ import annotations

import pytest

from nextproxy.config.model import (
    Address,
    CertificateConfig,
    Config,
    EncodedSlashes,
    PathRoute,
    PemSource,
    SniAction,
    SniRoute,
    Upstream,
)
from nextproxy.core.routing import RouteTable, check_path
from nextproxy.errors import HttpError

PEM = CertificateConfig(PemSource(b"", "cert"), PemSource(b"", "key"))


def table(*, catch_all: bool = False) -> RouteTable:
    routes = [
        PathRoute("ns-websocket", "/ns/websocket", "ns-ws"),
        PathRoute("ns-sigmai", "/ns/sigmai", "ns"),
        PathRoute("mc-sigmai", "/mc/sigmai", "mc"),
        PathRoute("sfs-sigmai", "/sfs/sigmai", "sfs"),
    ]
    if catch_all:
        routes.append(PathRoute("default", "/", "ns"))
    upstreams = tuple(Upstream(n, (Address("127.0.0.1", 1),)) for n in ("ns-ws", "ns", "mc", "sfs", "api"))
    sni = (
        SniRoute("ns-api", ("api.ns.example",), SniAction.PASSTHROUGH, "api"),
        SniRoute("mc-api", ("api.mc.example",), SniAction.TERMINATE, "api"),
        SniRoute("wild", ("*.wild.example",), SniAction.PASSTHROUGH, "api"),
    )
    config = Config(Address("127.0.0.1", 1), Address("127.0.0.1", 2), (PEM,), upstreams, tuple(routes), sni)
    return RouteTable(config)


@pytest.mark.parametrize(
    "target, route",
    [
        (b"/ns/sigmai", "ns-sigmai"),
        (b"/ns/sigmai/", "ns-sigmai"),
        (b"/ns/sigmai/x", "ns-sigmai"),
        (b"/ns/sigmai?q=1", "ns-sigmai"),
        (b"/ns/sigmai/x/y?z=/../", "ns-sigmai"),  # a query is not a path: dots there are data
        (b"/ns/websocket", "ns-websocket"),
        (b"/mc/sigmai/a", "mc-sigmai"),
        (b"/sfs/sigmai", "sfs-sigmai"),
        (b"/ns/sigmaix", None),
        (b"/ns/sigma", None),
        (b"/ns", None),
        (b"/", None),
        (b"/NS/sigmai", None),  # paths are case-sensitive
        (b"/ns//sigmai", None),  # not merged: matched literally
        (b"/other", None),
        (b"/ns/sigmai;x", None),
    ],
)
def test_path_matching(target: bytes, route: str | None) -> None:
    match = table().match_path(None, target)
    assert (match.name if match else None) == route


@pytest.mark.parametrize(
    "target",
    [
        b"/ns/sigmai/../../mc/sigmai",
        b"/ns/sigmai/..",
        b"/ns/sigmai/./x",
        b"/ns/sigmai/%2e%2e/mc",
        b"/ns/sigmai/%2E./mc",
        b"/ns/sigmai/.%2e",
        b"/ns/sigmai%2F..%2Fmc",
        b"/ns/sigmai/a%2F..%2F..%2Fmc/sigmai",  # dot segments between encoded separators
        b"/ns/sigmai/a%5C..%5Cb",
        b"/ns/sigmai/%2e%2E%2fb",
        # path parameters after the dots: Tomcat, Jetty and Spring resolve them as ".."
        b"/ns/sigmai/..;/manager/html",
        b"/ns/sigmai/..;jsessionid=1/x",
        b"/ns/sigmai/%2e%2e;/x",
        b"/ns/sigmai/.;/x",
        b"/ns/sigmai/x/..;",
        b"/ns/sigmai/..%3b/x",
        b"/ns/sigmai/..%00/x",  # an encoded NUL ends a C upstream's path
        b"/ns%2fsigmai",  # matches nothing raw, ns-sigmai once decoded
        b"/ns%2Fsigmai/x",
        b"/%6Es/sigmai",  # an encoded letter: the same escape, another route
        b"/ns/sigmai%5Cx",  # a backslash an upstream may read as a separator
        b"/ns%5Csigmai",
        b"/ns\\sigmai",
        b"/ns/sigmai/%zz",
        b"/ns/sigmai/%4",
        b"*",
        b"http://example.com/ns/sigmai",
        b"example.com:443",
    ],
)
def test_unsafe_targets_are_400(target: bytes) -> None:
    with pytest.raises(HttpError) as info:
        table().match_path(None, target)
    assert info.value.status == 400


@pytest.mark.parametrize(
    "target", [b"/ns/sigmai/.well-known", b"/ns/sigmai/a.b/..c", b"/ns/sigmai/...", b"/ns/sigmai/%41", b"/ns/sigmai/a;b/c", b"/ns/sigmai/x;v=1"]
)
def test_dots_inside_names_are_fine(target: bytes) -> None:
    assert check_path(target) == target.split(b"?")[0]


@pytest.mark.parametrize(
    "target, route",
    [
        (b"/ns/sigmai/files/a%2Fb", "ns-sigmai"),  # an identifier holding a slash
        (b"/ns/sigmai/files/a%2fb%5Cc?x=%2F", "ns-sigmai"),
        (b"/mc/sigmai/%2Fns%2Fsigmai", "mc-sigmai"),  # decodes to /mc/sigmai//ns/sigmai: still mc
        (b"/ns/sigmai/..a%2F.b", "ns-sigmai"),  # dots inside names, not segments
        (b"/nowhere/a%2Fb", None),  # no route raw, none decoded: a plain 404
    ],
)
def test_encoded_slashes_are_forwarded_by_default(target: bytes, route: str | None) -> None:
    match = table().match_path(None, target)
    assert (match.name if match else None) == route


def test_a_route_may_reject_encoded_slashes() -> None:
    strict = PathRoute("strict", "/strict", "ns", encoded_slashes=EncodedSlashes.REJECT)
    upstreams = (Upstream("ns", (Address("127.0.0.1", 1),)),)
    routes = RouteTable(Config(Address("127.0.0.1", 1), Address("127.0.0.1", 2), (PEM,), upstreams, (strict,), ()))
    for target in (b"/strict/a%2Fb", b"/strict/a%5cb"):
        with pytest.raises(HttpError) as info:
            routes.match_path(None, target)
        assert info.value.status == 400 and "encoded" in info.value.reason
    assert routes.match_path(None, b"/strict/a%41b?q=%2F") is strict  # other escapes, and the query, are fine


def test_catch_all_prefix_and_longest_first() -> None:
    routes = table(catch_all=True)
    assert routes.match_path(None, b"/anything").name == "default"  # type: ignore[union-attr]
    assert routes.match_path(None, b"/ns/sigmai/x").name == "ns-sigmai"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "name, expected",
    [
        ("api.ns.example", "ns-api"),
        ("api.mc.example", "mc-api"),
        ("x.wild.example", "wild"),
        ("wild.example", None),
        ("a.b.wild.example", None),  # a wildcard covers one label only
        ("other.example", None),
        (None, None),
    ],
)
def test_sni_classes(name: str | None, expected: str | None) -> None:
    match = table().match_sni(name)
    assert (match.name if match else None) == expected


def test_terminated_api_name_routes_every_path_to_its_upstream() -> None:
    routes = table()
    sni = routes.match_sni("api.mc.example")
    route = routes.match_path(sni, b"/v1/anything?x")
    assert route is not None and route.name == "mc-api" and route.upstream == "api"


def test_describe_lists_every_route() -> None:
    rows = table().describe()
    text = "\n".join(" ".join(r) for r in rows)
    for needle in ("api.ns.example", "passthrough", "/ns/websocket", "/sfs/sigmai", "404"):
        assert needle in text
