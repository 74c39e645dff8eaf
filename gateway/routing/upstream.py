"""One instance of a version, as the route table and the health checker see it.

Its address and health. The connections to it are the data plane's
(csrc/proxy/dataplane.pyx): keep-alive, reused, at most `max_connections`
open at once (requests beyond that wait for one), each connect bounded by
`connect_timeout`.
"""
from __future__ import annotations


class InstancePool:
    """One ip:port."""

    def __init__(self, ip: str, port: int, max_connections: int = 256,
                 connect_timeout: float = 2.0):
        self.ip = ip
        self.port = port
        self.max_connections = max_connections
        self.connect_timeout = connect_timeout
        # Down when active health checks fail or the registry says so.
        self.check_healthy = True
        self.registry_healthy = True
        self.health_path = "/health"  # None: a TCP connect is the health check
        self.grpc_port = None  # where the instance serves v2 over gRPC, if it does
        self.closed = False  # the instance left the route table
        # Outlier detection (the data plane's): out until the loop's time `ejected_until`.
        self.ejected = False
        self.ejected_until = 0.0
        self.ejections = 0  # in a row: each doubles the time out

    @property
    def healthy(self) -> bool:
        return self.check_healthy and self.registry_healthy and not self.ejected

    def close(self) -> None:
        """The instance left the table (the data plane closes its connections)."""
        self.closed = True
