"""Rate limits per service and per key (header value, token, client address).

Declared in a service's ``metadata.rate_limits`` (see filter.py for the
format); ``validate_rate_limits`` is what the control plane calls on create
and modify. Local scope: compiled token buckets in each gateway process
(local.py). Global scope: one atomic Lua script per request on the Redis of
``--registry`` (redis_limiter.py).
"""
from .filter import (LimitSpec, RateLimitFilter, parse_rate_limits, validate_rate_limits)
from .local import TokenBuckets

__all__ = ["validate_rate_limits", "parse_rate_limits", "LimitSpec", "RateLimitFilter",
           "TokenBuckets"]
