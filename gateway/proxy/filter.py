"""The contract of a gateway filter, declared once.

A filter is one concern applied to one request (auth, a rate limit, the
version choice), called with the request's Exchange (csrc/proxy/chain.pyx: the
request, the route and backend chosen so far, headers to add upstream and to
the client's answer). It returns:

* None: the request goes on to the next filter;
* a Response: the client gets it now and no later filter runs;
* an awaitable of either: the filter must wait (a global rate limit whose lease
  is empty). The chain pauses the request there and, when the awaitable gives
  None, resumes it with the next filter; no filter resumes anything itself.

Filters run on the event loop and must not block it. The compiled chain calls
them in order; compiled filters (route, auth, version) and Python ones (rate
limits) are interchangeable.
"""
from __future__ import annotations

from typing import Awaitable, Protocol, Union, runtime_checkable

from ..server import Response


@runtime_checkable
class Filter(Protocol):
    def __call__(self, ex) -> Union[None, Response, Awaitable[Union[None, Response]]]: ...
