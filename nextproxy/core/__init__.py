"""The sans-IO core: bytes in, bytes and facts out.

Nothing here touches sockets, the event loop, clocks, logging or metrics (tests/test_layering.py
enforces it). The contract, as in h11: the core raises only the types in ``nextproxy.errors``;
any other exception escaping from here is a bug, which the shell logs and turns into a closed
connection.
"""
