"""The demo kit: a throwaway PKI (the one certificate minter, also used by the tests), stand-in
upstreams and their channels, a small WebSocket client, and the ``demo``/``pki``/``standins``
commands. Only ``nextproxy.cli`` imports it; the proxy itself never does.
"""
