"""Limits a server derives from its process's resources, for the gateway and the workers
alike: a connection cap below the descriptor limit, so that an idle-connection flood meets
the cap (and its eviction) before accept() meets EMFILE."""
import resource


def default_max_connections() -> int:
    """Client connections at most: what the descriptor limit leaves once a quarter (64 at
    least) is kept for upstream connections, the store and logs; 100,000 at most."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 100_000
    return max(16, min(100_000, soft - max(64, soft // 4)))
