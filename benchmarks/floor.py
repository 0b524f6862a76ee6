"""What one proxied request costs in the libraries nextproxy is built on, before any I/O.

    python benchmarks/floor.py          # ~10 s, in-process, no network, no installs

run.py measures whole processes under load; this measures the pieces in isolation, warm, with
one connection (the most favourable case: real load adds cache misses on top). It answers "how
low can the CPU per request go with this design?": the sans-IO core runs HTTP/1.1 on our own
codec (core/codec.py) for both legs and TLS on pyOpenSSL memory BIOs, so their cost per
request is a floor that no change in the shell can go below. Compare it with issue 6's budget
of 100 µs per keep-alive request for the whole process (nginx: ~24 µs, measured by run.py).
The h11 rows show what h11 cost for the same work before issue 11 moved it off the hot path.

Each line is the median of 5 runs of N iterations, in µs per request.
"""

from __future__ import annotations

import ssl
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import h11

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nextproxy.config.model import Address, CertificateConfig, Config, PathRoute, PemSource, Upstream  # noqa: E402
from nextproxy.core.codec import RequestParser, parse_response  # noqa: E402
from nextproxy.core.headers import ClientInfo  # noqa: E402
from nextproxy.core.responses import client_response  # noqa: E402
from nextproxy.core.http1 import HttpSession, UpstreamLeg  # noqa: E402
from nextproxy.core.routing import RouteTable  # noqa: E402
from nextproxy.core.tls import TlsEngine  # noqa: E402
from nextproxy.demo.pki import client_ssl_context, make_pki  # noqa: E402
from nextproxy.edge.tlscontexts import build_edge_context, load_certificate_info  # noqa: E402

# What wrk sends and what the benchmark's nginx answers for GET /small (W1).
REQUEST = b"GET /small HTTP/1.1\r\nHost: 127.0.0.1:18443\r\n\r\n"
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Sun, 29 Nov 2026 08:00:00 GMT\r\n"
    b"Content-Type: text/plain\r\nContent-Length: 12\r\nConnection: keep-alive\r\n\r\nhello world\n"
)
RUNS = 5


def per_call(step: Callable[[], object], n: int) -> float:
    """Median µs per call of ``step`` over RUNS runs of ``n`` calls (after a warm-up run)."""
    for _ in range(n // 10):
        step()
    samples = []
    for _ in range(RUNS):
        start = time.perf_counter()
        for _ in range(n):
            step()
        samples.append((time.perf_counter() - start) / n * 1e6)
    return statistics.median(samples)


def h11_client_leg() -> Callable[[], object]:
    """The h11 calls the edge (server role) makes per keep-alive request."""
    conn = h11.Connection(h11.SERVER)
    upstream = h11.Connection(h11.CLIENT)
    upstream.send(h11.Request(method="GET", target="/", headers=[("host", "x")]))
    upstream.send(h11.EndOfMessage())
    upstream.receive_data(RESPONSE)
    head = upstream.next_event()
    assert isinstance(head, h11.Response)
    headers, data, end = list(head.headers), h11.Data(data=b"hello world\n"), h11.EndOfMessage()

    def step() -> None:
        conn.receive_data(REQUEST)
        conn.next_event()  # Request
        conn.next_event()  # EndOfMessage
        conn.send(h11.Response(status_code=200, headers=headers, reason=b"OK", _parsed=True))
        conn.send(data)
        conn.send(end)
        conn.start_next_cycle()

    return step


def h11_upstream_leg() -> Callable[[], object]:
    """The h11 calls the edge (client role) makes per request on a pooled upstream connection."""
    conn = h11.Connection(h11.CLIENT)
    headers = [(b"host", b"127.0.0.1:18443"), (b"x-forwarded-for", b"127.0.0.1"), (b"x-forwarded-proto", b"https")]
    end = h11.EndOfMessage()

    def step() -> None:
        conn.send(h11.Request(method=b"GET", target=b"/small", headers=headers, _parsed=True))
        conn.send(end)
        conn.receive_data(RESPONSE)
        conn.next_event()  # Response
        conn.next_event()  # Data
        conn.next_event()  # EndOfMessage
        conn.start_next_cycle()

    return step


def codec_heads() -> dict[str, Callable[[], object]]:
    """Our codec alone, one step per head: what issue 11 calls "the codec's cost per head"."""
    parser = RequestParser(ClientInfo(address="127.0.0.1", server_name=None))
    response_head = RESPONSE[: RESPONSE.index(b"\r\n\r\n") + 4]
    request = parser.parse(REQUEST)
    response = parse_response(response_head)

    def request_in() -> object:
        return parser.parse(REQUEST)  # validates, applies the policy, builds the forwarded fields

    def request_out() -> object:
        return request.method + b" " + request.target + b" HTTP/1.1\r\n" + request.forward

    def response_in() -> object:
        return parse_response(response_head)

    def response_out() -> object:
        return client_response(response, request, close=False)

    return {"parse request": request_in, "write forwarded request": request_out,
            "parse response": response_in, "write client response": response_out}  # fmt: skip


def http_session() -> Callable[[], object]:
    """nextproxy's HttpSession (our codec on both legs + routing + header policy), no I/O."""
    pem = CertificateConfig(PemSource(b"", "c"), PemSource(b"", "k"))
    upstream = Upstream("n", (Address("127.0.0.1", 18080),))
    config = Config(Address("127.0.0.1", 0), Address("127.0.0.1", 1), (pem,), (upstream,), (PathRoute("n", "/", "n"),))
    session = HttpSession(RouteTable(config), None, ClientInfo(address="127.0.0.1", server_name=None), config.limits)
    leg = UpstreamLeg("127.0.0.1:18080", 65536)

    def step() -> None:
        session.client_data(REQUEST)
        session.upstream_connected(leg)
        session.upstream_data(RESPONSE)

    return step


def c_parser() -> Callable[[], object] | None:
    """Both heads parsed by httptools (llhttp, C) and re-serialized by hand, if it is installed.

    Not a nextproxy dependency: shown only to size the alternative to h11 (what uvicorn uses).
    """
    try:
        import httptools  # type: ignore[import-not-found]
    except ImportError:
        return None

    class Sink:
        def __init__(self) -> None:
            self.url, self.headers, self.body = b"", [], []  # type: ignore[var-annotated]

        def on_url(self, url: bytes) -> None:
            self.url += url

        def on_header(self, name: bytes, value: bytes) -> None:
            self.headers.append((name.lower(), value))

        def on_body(self, body: bytes) -> None:
            self.body.append(body)

    request, response = Sink(), Sink()
    request_parser, response_parser = httptools.HttpRequestParser(request), httptools.HttpResponseParser(response)

    def step() -> bytes:
        request.url, request.headers = b"", []
        request_parser.feed_data(REQUEST)
        head = [request_parser.get_method(), b" ", request.url, b" HTTP/1.1\r\n"]
        for name, value in request.headers:
            head += (name, b": ", value, b"\r\n")
        head.append(b"x-forwarded-for: 127.0.0.1\r\nx-forwarded-proto: https\r\n\r\n")
        b"".join(head)
        response.headers, response.body = [], []
        response_parser.feed_data(RESPONSE)
        head = [b"HTTP/1.1 %d OK\r\n" % response_parser.get_status_code()]
        for name, value in response.headers:
            if name != b"connection":
                head += (name, b": ", value, b"\r\n")
        head.append(b"\r\n")
        return b"".join(head + response.body)

    return step


class TlsPair:
    """A TlsEngine and a stdlib ssl client joined by memory BIOs, handshake done."""

    def __init__(self) -> None:
        pki = make_pki(("localhost",))
        cert = load_certificate_info(
            CertificateConfig(PemSource(pki.edge.certificate, "edge cert"), PemSource(pki.edge.key, "edge key"))
        )
        self.server_context = build_edge_context(cert)
        self.client_context = client_ssl_context(pki.ca.certificate)
        self.server_seconds = 0.0
        self.client, self.incoming, self.outgoing = self._client()
        self.engine = self._handshake()

    def _client(self) -> tuple[ssl.SSLObject, ssl.MemoryBIO, ssl.MemoryBIO]:
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        return self.client_context.wrap_bio(incoming, outgoing, server_hostname="localhost"), incoming, outgoing

    def _handshake(self) -> TlsEngine:
        client, incoming, outgoing = self.client, self.incoming, self.outgoing
        try:
            client.do_handshake()
        except ssl.SSLWantReadError:
            pass
        start = time.perf_counter()
        engine = TlsEngine(self.server_context, outgoing.read())
        flight = engine.data_to_send()
        self.server_seconds += time.perf_counter() - start
        incoming.write(flight)
        client.do_handshake()
        finished = outgoing.read()
        start = time.perf_counter()
        engine.receive(finished)
        flight = engine.data_to_send()
        self.server_seconds += time.perf_counter() - start
        incoming.write(flight)
        return engine

    def handshake_server_cost(self, n: int) -> float:
        """µs of server-side work (TlsEngine calls only) per full handshake, median of RUNS."""
        samples = []
        for _ in range(RUNS):
            self.server_seconds = 0.0
            for _ in range(n):
                self.client, self.incoming, self.outgoing = self._client()
                self._handshake()
            samples.append(self.server_seconds / n * 1e6)
        return statistics.median(samples)

    def records_step(self, count: int) -> Callable[[], object]:
        """Server side of one request/response: decrypt the request record, encrypt the response.

        Every call needs a fresh record (record sequence numbers), so ``count`` are made first.
        """
        records = []
        for _ in range(count):
            self.client.write(REQUEST)
            records.append(self.outgoing.read())
        feed = iter(records)
        engine = self.engine

        def step() -> None:
            engine.receive(next(feed))
            engine.send(RESPONSE)
            engine.data_to_send()

        return step


def main() -> None:
    n = 10_000
    client_leg = per_call(h11_client_leg(), n)
    upstream_leg = per_call(h11_upstream_leg(), n)
    session = per_call(http_session(), n)
    heads = {name: per_call(step, n * 5) for name, step in codec_heads().items()}
    tls = TlsPair()
    records = per_call(tls.records_step(n // 10 + RUNS * n), n)
    handshake = tls.handshake_server_cost(200)
    print(f"Python {sys.version.split()[0]}, h11 {h11.__version__}; µs per keep-alive request, warm, one connection\n")
    rows = [(f"codec: {name}", value) for name, value in heads.items()]
    rows += [
        ("codec: the four heads", sum(heads.values())),
        ("HttpSession (codec both legs + routing + header policy + body)", session),
        ("TLS records in + out (pyOpenSSL, memory BIOs)", records),
        ("floor of the sans-IO core (HttpSession + TLS)", session + records),
        ("for comparison: h11, client leg (parse request, send response, cycle)", client_leg),
        ("for comparison: h11, upstream leg (send request, parse response, cycle)", upstream_leg),
        ("for comparison: h11, both legs (the hot path before issue 11)", client_leg + upstream_leg),
    ]
    for label, value in rows:
        print(f"  {label:<76} {value:7.1f}")
    print(f"\n  {'issue 6 budget for the whole process (core + shell + syscalls)':<76} {100:7.1f}")
    alternative = c_parser()
    if alternative is None:
        print("\n  (pip install httptools to also see a C parser doing both heads)")
    else:
        label = "for comparison: httptools (C) parsing + re-serializing both heads"
        print(f"  {label:<76} {per_call(alternative, n):7.1f}")
    print(f"\nServer side of a full TLS 1.3 handshake (TlsEngine, P-256 certificate): {handshake:.0f} µs")


if __name__ == "__main__":
    main()
