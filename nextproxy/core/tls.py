"""TlsEngine: the server side of TLS 1.3 over OpenSSL memory BIOs (pyOpenSSL), bytes in, bytes out.

The shell feeds ciphertext with ``receive()`` and gets plaintext back; whatever OpenSSL wants
to write (handshake flights, records, alerts, session tickets) waits in ``data_to_send()``.
After the handshake the engine describes the client certificate (``PeerCertificate``) and
verifies its chain in-process (``core/peercert.py``) at the time the shell
passes in. Every pyOpenSSL failure becomes a ``TlsError`` whose alert, if any, is already
queued. This module must never touch sockets, files, clocks, the event loop or logging.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from cryptography import x509
from cryptography.x509.verification import Store
from OpenSSL import SSL, crypto
from OpenSSL._util import ffi as _ffi
from OpenSSL._util import lib as _lib

from nextproxy.config.model import ClientAuth
from nextproxy.core.handshake import VerifyNote, openssl_failure_reason
from nextproxy.core.peercert import PeerCertificate, describe_certificate
from nextproxy.errors import TlsError

__all__ = [
    "ALPN_HTTP1", "NoApplicationProtocol", "PeerCertificate", "TlsEngine", "TlsServerContext", "describe_certificate",
    "note_verify_error", "serve_http1_only",
]  # fmt: skip

# One TLS record carries at most 16 KiB of plaintext (RFC 8446 section 5.1) and SSL_read
# returns at most one record, so a bigger buffer would only cost allocation.
READ_CHUNK = 16384
# The outgoing BIO is drained in chunks this size; a handshake flight fits in one.
DRAIN_CHUNK = 65536


# How many bytes a memory BIO holds (BIO_CTRL_INFO on a memory BIO; NULL asks only for the
# length). pyOpenSSL exposes no public call for it. On the incoming BIO it ends a read loop without
# one SSL_read that fails with WantReadError (an exception per client read); on the outgoing one
# it sizes the drain: pyOpenSSL allocates the whole buffer asked for, and a 64 KiB allocation per
# drain cost ~5 µs in the middle of a handshake (measured: 9.5 vs 4.2 µs for the server's flight).
_bio_unread: Callable[..., int] | None = getattr(_lib, "BIO_get_mem_data", None)

# Application data (after the handshake) goes through OpenSSL's calls directly instead of through
# pyOpenSSL's methods: each of those converts its argument, re-checks its callback helpers and is
# a Python frame more, about 1 µs per call on a path that makes four per proxied request.
# Failures still go through pyOpenSSL (``_raise_ssl_error``, what its own recv and send call), so
# they raise exactly the exceptions they always did. Without these private names (another
# pyOpenSSL) the public methods are used.
_DIRECT_OK = _bio_unread is not None and hasattr(SSL.Connection, "_raise_ssl_error") and all(
    name in SSL.Connection.__init__.__code__.co_names for name in ("_ssl", "_into_ssl", "_from_ssl")
)
_SSL_read, _SSL_write, _SSL_pending, _SSL_get_error = _lib.SSL_read, _lib.SSL_write, _lib.SSL_pending, _lib.SSL_get_error
_BIO_read, _BIO_write, _SSL_do_handshake = _lib.BIO_read, _lib.BIO_write, _lib.SSL_do_handshake
_SSL_set_accept_state = _lib.SSL_set_accept_state
_WANT_READ, _ZERO_RETURN = _lib.SSL_ERROR_WANT_READ, _lib.SSL_ERROR_ZERO_RETURN
# A fresh buffer per read, as pyOpenSSL's (not zeroed: OpenSSL fills what it reports). One shared
# buffer would be cheaper, but cffi releases the GIL during the call, so two threads could fill it.
_new_buffer = _ffi.new_allocator(should_clear_after_alloc=False)


_NO_VERIFY_CALLBACK = VerifyNote()
"""The note of every connection whose context verifies no client certificate: never written."""

# A connection of a context with no pyOpenSSL callback is made without pyOpenSSL's constructor:
# that constructor enters every connection in a class-wide WeakValueDictionary (SSL pointer ->
# Connection) that only its Python callbacks (verify, ALPN, SNI...) look up, and the entry, its
# KeyedRef and the removal when the connection dies cost ~110 bytecode instructions per
# connection, as much again as the constructor itself. ``_bare_connection`` makes the same
# object, but only while pyOpenSSL's constructor is the one it was written from (every name it
# uses, as in pyOpenSSL 26.4; 25.0 is another); any other version gets pyOpenSSL's own.
_CONSTRUCTOR_NAMES = (
    "isinstance", "Context", "TypeError", "_used", "_lib", "SSL_new", "_context", "_ffi", "gc", "SSL_free",
    "_ssl", "SSL_set_mode", "SSL_MODE_AUTO_RETRY", "_app_data", "_alpn_select_callback_args",
    "_verify_helper", "_verify_callback", "_cookie_generate_helper", "_cookie_verify_helper",
    "_reverse_mapping", "_socket", "BIO_new", "BIO_s_mem", "_into_ssl", "_openssl_assert", "NULL",
    "_from_ssl", "SSL_set_bio", "SSL_set_fd", "_asFileDescriptor",
)  # fmt: skip
_BARE_OK = _DIRECT_OK and SSL.Connection.__init__.__code__.co_names == _CONSTRUCTOR_NAMES
_SSL_new, _SSL_free, _SSL_set_bio, _SSL_set_mode = _lib.SSL_new, _lib.SSL_free, _lib.SSL_set_bio, _lib.SSL_set_mode
_BIO_new, _BIO_free, _BIO_MEMORY = _lib.BIO_new, _lib.BIO_free, _lib.BIO_s_mem()
_AUTO_RETRY, _new_object = _lib.SSL_MODE_AUTO_RETRY, object.__new__


class _BareConnection(SSL.Connection):
    """What pyOpenSSL's constructor makes for a memory-BIO connection of a context without
    callbacks; the attributes it sets to None (or to the context's, all None without
    callbacks) are class defaults here, so a connection stores only the context and its three
    OpenSSL pointers."""

    _socket = _app_data = _alpn_select_callback_args = None
    _verify_helper = _verify_callback = _cookie_generate_helper = _cookie_verify_helper = None


_NULL = _ffi.NULL


def _bare_connection(context: SSL.Context) -> SSL.Connection | None:
    """pyOpenSSL's ``Connection(context, None)``, not entered in its callback map; None if
    OpenSSL could not make one (then pyOpenSSL's constructor fails and says why)."""
    ssl, incoming, outgoing = _SSL_new(context._context), _BIO_new(_BIO_MEMORY), _BIO_new(_BIO_MEMORY)
    if ssl == _NULL or incoming == _NULL or outgoing == _NULL:
        for pointer, free in ((ssl, _SSL_free), (incoming, _BIO_free), (outgoing, _BIO_free)):
            if pointer != _NULL:
                free(pointer)
        return None
    _SSL_set_bio(ssl, incoming, outgoing)  # the SSL object owns the BIOs from here
    _SSL_set_mode(ssl, _AUTO_RETRY)  # as pyOpenSSL's constructor
    context._used = True  # pyOpenSSL's: a context is immutable once it made a connection
    conn = _new_object(_BareConnection)
    conn._ssl, conn._context, conn._into_ssl, conn._from_ssl = _ffi.gc(ssl, _SSL_free), context, incoming, outgoing
    return conn


ALPN_HTTP1 = b"http/1.1"
_ALPN_REFUSALS: dict[int, str] = {}
"""SSL pointer -> why the ALPN callback refused it, until that connection's failure reads it."""


def _select_http1(ssl: Any, out: Any, outlen: Any, offered: Any, size: int, arg: Any) -> int:
    """OpenSSL's ALPN select callback: http/1.1 when the client offers it, else refuse (OpenSSL
    then sends no_application_protocol, RFC 7301 3.2). Called without pyOpenSSL, so its
    connections need no entry in pyOpenSSL's callback map. OpenSSL has checked the list's
    framing; the answer points into it (OpenSSL copies it before the list goes)."""
    data = _ffi.buffer(offered, size)[:]
    names: list[bytes] = []
    pos = 0
    while pos < size:
        length = data[pos]
        name = data[pos + 1 : pos + 1 + length]
        if name == ALPN_HTTP1:
            out[0] = offered + pos + 1
            outlen[0] = length
            return _lib.SSL_TLSEXT_ERR_OK  # type: ignore[no-any-return]
        names.append(name)
        pos += 1 + length
    key = int(_ffi.cast("uintptr_t", ssl))
    _ALPN_REFUSALS[key] = f"ALPN offers {b', '.join(names)!r}, not http/1.1"
    return _lib.SSL_TLSEXT_ERR_ALERT_FATAL  # type: ignore[no-any-return]


# One C callback for every context, alive as long as the module; an exception in it (none is
# expected: OpenSSL checked the list) refuses the handshake rather than selecting nothing.
_SELECT_HTTP1 = _ffi.callback(
    "int (*)(SSL *, unsigned char **, unsigned char *, const unsigned char *, unsigned int, void *)",
    _select_http1, error=_lib.SSL_TLSEXT_ERR_ALERT_FATAL,
)


def serve_http1_only(context: SSL.Context) -> None:
    """ALPN on ``context``: http/1.1 when offered, no_application_protocol when the client
    offers only others, HTTP/1.1 without ALPN when it offers none. In OpenSSL's callback, not
    pyOpenSSL's (which needs every connection in its callback map)."""
    _lib.SSL_CTX_set_alpn_select_cb(context._context, _SELECT_HTTP1, _ffi.NULL)


class NoApplicationProtocol(Exception):
    """A handshake refused for its ALPN offer (RFC 7301 3.2), in the words of the refusal.

    ``_select_http1`` answers OpenSSL with SSL_TLSEXT_ERR_ALERT_FATAL, OpenSSL queues the
    no_application_protocol alert and fails the handshake, and the engine's failure carries this
    (a pyOpenSSL ALPN callback raising it would have the same effect: pyOpenSSL re-raises it).
    """


@dataclass(frozen=True, slots=True, eq=False)
class TlsServerContext:
    """One edge TLS configuration, chosen per SNI before the handshake (``edge.tlscontexts``).

    ``context`` is immutable once a connection used it (pyOpenSSL >= 26.2), so a reload builds
    new ones. ``client_cas`` are the configured client CA certificates, used for the verdict in
    ``PeerCertificate.verified`` whatever the client-auth mode.
    """

    context: SSL.Context
    client_auth: ClientAuth = ClientAuth.NONE
    client_cas: tuple[x509.Certificate, ...] = ()
    name: str = "default"
    """Which certificate and SNI route this context serves (logs only)."""
    pyopenssl_callbacks: bool = True
    """A connection may meet one of pyOpenSSL's Python callbacks (verify, its ALPN), which find
    the connection in pyOpenSSL's map. ``build_edge_context`` says False where there is none
    (ALPN by ``serve_http1_only``, no client certificate): the engine then skips that map."""
    store: Store | None = field(init=False, repr=False)

    def __post_init__(self) -> None:
        # The store is parsed once per context, not per handshake; the verifier itself must be
        # built per handshake because the verification time is part of it.
        object.__setattr__(self, "store", Store(list(self.client_cas)) if self.client_cas else None)


class TlsEngine:
    """One server-side TLS connection. Not thread-safe; one per client connection."""

    def __init__(self, context: TlsServerContext, initial: bytes = b"", now: datetime | None = None) -> None:
        self._context = context
        self._now = now
        self.handshake_complete = False
        self.peer_certificate: PeerCertificate | None = None
        self.peer_closed = False
        self._closed = False
        # Bytes already taken out of the BIO (to learn whether an alert was queued) but not yet
        # handed to the shell.
        self._stash = b""
        self._bio_touched = False
        """OpenSSL was called since the last drain, so the BIO may hold records. Only our calls
        write there; knowing that spares a read of an empty BIO, which pyOpenSSL answers with an
        exception (most flushes of a request have nothing to send)."""
        self.error: TlsError | None = None
        """The failure that ended this engine; set before any alert is flushed."""
        self._error_raised = False
        # Only a client-auth context has a verify callback to write a code into the note; the
        # others share one that nothing writes (their connections carry no app data at all).
        self._verify_note = _NO_VERIFY_CALLBACK if context.client_auth is ClientAuth.NONE else VerifyNote()
        bare = _bare_connection(context.context) if _BARE_OK and not context.pyopenssl_callbacks else None
        try:
            self._conn = conn = SSL.Connection(context.context, None) if bare is None else bare
        except Exception as exc:  # a context OpenSSL refuses to make connections from
            raise self._fail(exc) from None
        if self._verify_note is not _NO_VERIFY_CALLBACK:
            conn.set_app_data(self._verify_note)
        self._direct: tuple[Any, Any, Any] | None = None
        """(SSL, incoming BIO, outgoing BIO) for the direct calls, or None: use pyOpenSSL's."""
        if _DIRECT_OK:
            pointers = (conn._ssl, conn._into_ssl, conn._from_ssl)
            if pointers[1] is not None and pointers[2] is not None:  # memory BIOs, as asked
                self._direct = pointers
        if self._direct is not None:
            _SSL_set_accept_state(self._direct[0])  # pyOpenSSL's set_accept_state, one frame less
        else:
            conn.set_accept_state()
        if initial:
            # Raising from a constructor would lose the object, and with it the alert queued in
            # it (the protocol_version alert for TLS 1.2 clients is decided right here). So the
            # failure is kept: check ``error`` after construction; receive() raises it anyway.
            try:
                self.receive(initial)
            except TlsError:
                self._error_raised = False

    # ------------------------------------------------------------------ bytes in

    def receive(self, ciphertext: bytes | memoryview) -> bytes:
        """Feed bytes from the client; return the plaintext they complete (maybe b"").

        ``b""`` feeds nothing (the shell's EOF convention) and only returns what is buffered.
        A failure is raised once (by the call that hit it, or by the first call after a failed
        constructor); afterwards the engine is inert and returns b"", so bytes that arrive while
        the shell lingers to deliver the alert are not counted as a second failure.

        Once the handshake is done, reading marks nothing to send: the only records OpenSSL
        writes while reading application data answer a KeyUpdate, and RFC 8446 section 4.6.3
        only asks that answer to precede our next record, which drains it with itself. An
        empty-BIO read per client read cost a pyOpenSSL exception (~2 µs).
        """
        if not self.handshake_complete:
            self._bio_touched = True
        if self.error is not None:
            if self._error_raised:
                return b""
            self._error_raised = True
            raise self.error
        if self.peer_closed:
            return b""
        conn = self._conn
        if ciphertext:
            direct = self._direct
            # A memory BIO takes everything or fails having taken nothing: then pyOpenSSL's call
            # tries again and raises its own exception.
            if direct is None or _BIO_write(direct[1], ciphertext if type(ciphertext) is bytes else _ffi.from_buffer(ciphertext), len(ciphertext)) <= 0:
                try:
                    conn.bio_write(ciphertext)
                except Exception as exc:  # per chunk: no lambda/_call indirection on the hot path
                    raise self._fail(exc) from None
        if not self.handshake_complete:
            direct = self._direct
            try:
                if direct is None:
                    conn.do_handshake()
                else:
                    # pyOpenSSL's do_handshake, without the WantReadError it raises for every
                    # flight that needs the client's answer (one exception per connection).
                    result = _SSL_do_handshake(direct[0])
                    if result <= 0 and _SSL_get_error(direct[0], result) == _WANT_READ:
                        return b""
                    if result != 1:
                        # The callbacks' failures, then OpenSSL's. A success has none to raise: a
                        # failing ALPN or verify callback fails the handshake (pyOpenSSL answers
                        # OpenSSL with a fatal alert or a refused chain).
                        conn._raise_ssl_error(direct[0], result)
            except SSL.WantReadError:
                return b""
            except Exception as exc:  # every pyOpenSSL failure; see _fail
                raise self._fail(exc) from None
            self._handshake_done()
        # The client may send its Finished and its first request in one segment: read on.
        direct = self._direct
        return self._read_all() if direct is None else self._read_all_direct(direct)

    def _read_all(self) -> bytes:
        """Everything decrypted so far, through pyOpenSSL's methods (without the direct calls)."""
        conn = self._conn
        parts: list[bytes] = []
        # Without read-ahead OpenSSL takes from the BIO only the record it decrypts: once the
        # BIO is empty and no decrypted byte is pending, the next SSL_read can only want more.
        # (Sizing each read to what the BIO holds measured ~1 µs slower per request: the two
        # extra calls cost more than the 16 KiB allocation they spare.)
        unread = _bio_unread
        bio = getattr(conn, "_into_ssl", None) if unread is not None else None
        while True:
            try:
                parts.append(conn.recv(READ_CHUNK))
                if bio is not None and unread is not None and not unread(bio, _ffi.NULL) and not conn.pending():
                    break
            except SSL.WantReadError:
                break
            except SSL.ZeroReturnError:
                # close_notify: from now on reads return b"", and the shell answers with ours.
                self.peer_closed = True
                break
            except Exception as exc:
                raise self._fail(exc) from None
        return b"".join(parts)

    def _read_all_direct(self, direct: tuple[Any, Any, Any]) -> bytes:
        """``_read_all`` with OpenSSL's calls (see ``_DIRECT_OK``)."""
        ssl, incoming, _ = direct
        buffer = _new_buffer("char[]", READ_CHUNK)
        parts: list[bytes] = []
        while True:
            count = _SSL_read(ssl, buffer, READ_CHUNK)
            if count > 0:
                parts.append(_ffi.buffer(buffer, count)[:])
                if not _bio_unread(incoming, _ffi.NULL) and not _SSL_pending(ssl):  # type: ignore[misc]
                    break
                continue
            error = _SSL_get_error(ssl, count)
            if error == _WANT_READ:
                break
            if error == _ZERO_RETURN:
                self.peer_closed = True  # close_notify, as in _read_all
                break
            try:
                self._conn._raise_ssl_error(ssl, count)
            except Exception as exc:
                raise self._fail(exc) from None
            break
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def end_of_stream(self) -> bytes:
        """The client's end of stream; afterwards the same as ``receive(b"")``.

        During the handshake OpenSSL is told (its BIO reports EOF), so it answers a truncated
        handshake exactly as a plain server on a socket would: decode_error, then TlsError.
        """
        if not self.handshake_complete and self.error is None:
            self._conn.bio_shutdown()
        return self.receive(b"")

    # ------------------------------------------------------------------ bytes out

    def send(self, plaintext: bytes | memoryview) -> None:
        """Encrypt application data; the records wait in ``data_to_send()``."""
        if not self.handshake_complete:
            raise TlsError("other", "send before the handshake completed")
        if self._closed:
            raise TlsError("other", "send after close")
        self._bio_touched = True
        conn = self._conn
        direct = self._direct
        if direct is not None and plaintext:
            # A memory BIO never pushes back, so SSL_write takes all of it or fails (a partial
            # write, were there one, finishes in pyOpenSSL's loop below).
            count = _SSL_write(direct[0], plaintext if type(plaintext) is bytes else _ffi.from_buffer(plaintext), len(plaintext))
            if count == len(plaintext):
                return
            if count <= 0:
                try:
                    conn._raise_ssl_error(direct[0], count)
                except Exception as exc:
                    raise self._fail(exc) from None
            plaintext = memoryview(plaintext)[max(count, 0) :]
        view = memoryview(plaintext)
        # The memory BIO never pushes back, but SSL_write may still take less than all: loop.
        while view:
            try:
                sent = conn.send(view)
            except Exception as exc:
                raise self._fail(exc) from None
            view = view[sent:]

    @property
    def may_have_output(self) -> bool:
        """False when ``data_to_send()`` would certainly return b"" (nothing called OpenSSL
        since the last drain and nothing is stashed): the shell skips the flush."""
        return self._bio_touched or bool(self._stash)

    def data_to_send(self) -> bytes:
        """Every pending outgoing byte: handshake flights, records, alerts, session tickets."""
        stash = self._stash
        if stash:
            self._stash = b""
        if not self._bio_touched:
            return stash
        self._bio_touched = False
        conn = self._conn
        direct = self._direct
        if direct is not None:
            # One read sized to what the BIO holds (pyOpenSSL's chunked reads below allocate the
            # whole chunk each time).
            pending = _bio_unread(direct[2], _ffi.NULL)  # type: ignore[misc]
            if not pending:
                return stash
            buffer = _new_buffer("char[]", pending)
            count = _BIO_read(direct[2], buffer, pending)  # a memory BIO hands out all it holds
            out: bytes
            if count > 0:
                out = _ffi.buffer(buffer, count)[:]
            else:  # never seen: pyOpenSSL's read says why
                try:
                    out = conn.bio_read(pending)
                except Exception as exc:
                    raise self._fail(exc) from None
            return stash + out if stash else out
        parts = [stash]
        while True:
            try:
                chunk = conn.bio_read(DRAIN_CHUNK)
            except SSL.WantReadError:
                return b"".join(parts)
            except Exception as exc:
                raise self._fail(exc) from None
            parts.append(chunk)
            if len(chunk) < DRAIN_CHUNK:
                # A memory BIO hands out all it holds up to the size asked: a short read means it
                # is empty, so skip the read that would only raise WantReadError (an exception
                # per flush was a measurable share of a small request).
                return b"".join(parts)

    def close(self) -> None:
        """Queue our close_notify. Idempotent; before the handshake there is nothing to close.

        OpenSSL refuses SSL_shutdown during a handshake; the shell just closes the socket then.
        """
        if self._closed or not self.handshake_complete:
            return
        self._closed = True
        self._bio_touched = True
        try:
            self._conn.shutdown()
        except Exception:  # a dead connection has nothing left to say; closing must not fail
            pass

    # ------------------------------------------------------------------ internals

    def _fail(self, exc: Exception) -> TlsError:
        """Turn a pyOpenSSL exception into a TlsError, noting whether an alert is queued."""
        text = str(exc).lower()
        code = self._verify_note.code  # set before any OpenSSL call can fail
        if _ALPN_REFUSALS and hasattr(self, "_conn"):  # ``_select_http1`` refused: its words
            refusal = _ALPN_REFUSALS.pop(int(_ffi.cast("uintptr_t", self._conn._ssl)), None)
            exc = NoApplicationProtocol(refusal) if refusal is not None else exc
        reason = "no_application_protocol" if isinstance(exc, NoApplicationProtocol) else openssl_failure_reason(text, code)
        received_alert = "alert" in text and reason != "protocol_version"
        # OpenSSL writes its fatal alert into the BIO before raising; a peer's alert gets no answer.
        queued = self._drain_into_stash() if hasattr(self, "_conn") else False
        detail = _short(exc) if isinstance(exc, SSL.Error) else f"{type(exc).__name__}: {exc}"
        error = TlsError(reason, detail, alert_sent=queued and not received_alert)
        self.error, self._error_raised = error, True
        return error

    def _drain_into_stash(self) -> bool:
        # There is no public BIO_ctrl_pending: a queued alert is observable only by reading it.
        parts = [self._stash]
        while True:
            try:
                parts.append(self._conn.bio_read(DRAIN_CHUNK))
            except Exception:
                break
        grew = len(parts) > 1
        self._stash = b"".join(parts)
        return grew

    # Facts about the handshake, read from OpenSSL when asked (for logs, the status page, tests):
    # reading all four after every handshake cost ~10 µs per connection that nothing used.

    @property
    def alpn(self) -> bytes | None:
        """The negotiated ALPN protocol, or None."""
        return (self._conn.get_alpn_proto_negotiated() or None) if self.handshake_complete else None

    @property
    def server_name(self) -> str | None:
        """SNI as OpenSSL saw it, lower-case."""
        name = self._conn.get_servername() if self.handshake_complete else None
        return name.decode("ascii", "replace").lower() if name else None

    @property
    def tls_version(self) -> str:
        """"TLSv1.3" once the handshake is done, else ""."""
        return self._conn.get_protocol_version_name() if self.handshake_complete else ""

    @property
    def group(self) -> str | None:
        """The key exchange group (e.g. X25519MLKEM768)."""
        return self._conn.get_group_name() if self.handshake_complete else None

    def _handshake_done(self) -> None:
        self.handshake_complete = True
        if self._context.client_auth is not ClientAuth.NONE:
            self.peer_certificate = self._describe_peer()

    def _describe_peer(self) -> PeerCertificate | None:
        # DER straight from OpenSSL first: it accepted these bytes, cryptography may be stricter,
        # and a certificate we cannot parse must still be reported (as unverified), not dropped.
        try:
            leaf = self._conn.get_peer_certificate()
            chain = self._conn.get_peer_cert_chain() or []
            if leaf is None:
                return None
            leaf_der = crypto.dump_certificate(crypto.FILETYPE_ASN1, leaf)
            chain_der = tuple(crypto.dump_certificate(crypto.FILETYPE_ASN1, c) for c in chain)
        except Exception:
            return None
        return describe_certificate(leaf_der, chain_der, self._context, self._now)


def note_verify_error(connection: SSL.Connection, errnum: int) -> None:
    """For a context's verify callback: remember why OpenSSL refuses this chain (for the reason)."""
    note = connection.get_app_data()
    if isinstance(note, VerifyNote):
        note.note(errnum)


def _short(exc: SSL.Error) -> str:
    """The OpenSSL reason strings of an error, without the library and function noise."""
    parts: list[str] = []
    for arg in exc.args:
        if isinstance(arg, list):
            parts += [str(entry[-1]) for entry in arg if isinstance(entry, tuple) and entry]
        else:
            parts.append(str(arg))
    return "; ".join(parts) or type(exc).__name__
