"""The process around the edge: lifecycle (serve, drain, reload), workers, admin port, metrics, logs.

It starts, stops, counts and reports; the bytes of a connection never pass through here.
"""
