"""Local rate limits: token buckets per key in this gateway process (compiled: csrc/ratelimit/ratelimit.pyx).

`TokenBuckets(rate, burst, max_keys)` keeps one bucket per key, at most
`max_keys` keys (least recently used forgotten). `take(key)` -> tokens left
(>= 0, passed) or minus the seconds until the next token (< 0, refused).
"""
from .._native.ratelimit import TokenBuckets, monotonic

DEFAULT_MAX_KEYS = 100_000


def retry_after(wait: float) -> int:
    """Retry-After for a refusal after which one waits `wait` seconds: whole, rounded up, >= 1."""
    import math
    return max(1, math.ceil(wait - 1e-9))


__all__ = ["TokenBuckets", "monotonic", "DEFAULT_MAX_KEYS", "retry_after"]
