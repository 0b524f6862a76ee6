"""nextproxy: a TLS 1.3 edge reverse proxy.

Reads the ClientHello, then by SNI either passes TLS through untouched or terminates it and
routes HTTP/1.1 and WebSocket by path. ``nextproxy.core`` is sans-IO; everything else is the
thin asyncio shell around it.
"""

__version__ = "0.1.0"
