"""The data path's asyncio shell: accept, passthrough splice, terminated connections, upstreams.

It moves bytes, owns every timeout and the backpressure, and hands protocol decisions to
``nextproxy.core``. It reports what happens through ``edge.observer.Observer`` and never imports
``nextproxy.process``.
"""
