"""The control plane: the admin API, service operations and the local launcher.

``attach_control_plane(app, location, public_url)`` mounts it on a GatewayApp
(``app.admin``): ``location`` is the store URL or state directory the gateway
uses, ``public_url`` the gateway's own base URL (``http://host:port``; an IPv6
host is best given in brackets, ``http://[::1]:8080`` -- build it with
``http_url(host, port)`` -- but an unbracketed ``http://:::8080`` is understood).

Modules: ``services`` (operations over the Store, no HTTP), ``admin`` (the
``/admin/...`` routes), ``launcher`` (local worker processes),
``registration_client`` (how a worker joins: Redis or a gateway's admin API).
"""
from __future__ import annotations

import ipaddress
import os
import socket


def url_host(host: str) -> str:
    """``host`` as it goes into a URL: an IPv6 literal in brackets."""
    host = (host or "").strip()
    if host.startswith("[") and host.endswith("]"):
        return host
    return f"[{host}]" if ":" in host else host


def http_url(host: str, port: int) -> str:
    """``http://host:port`` with an IPv6 host bracketed (``http://[::]:8080``)."""
    return f"http://{url_host(host)}:{int(port)}"


def _is_ipv6(text: str) -> bool:
    try:
        ipaddress.IPv6Address(text.split("%", 1)[0])
        return True
    except ValueError:
        return False


def split_url(url: str) -> tuple[str, str, int, str]:
    """(scheme, host without brackets, port, path) of ``url``.

    Unlike ``urllib.parse.urlsplit`` this copes with an unbracketed IPv6 host
    (``http://:::8080``, ``http://::1:8080``): when everything before the last
    ``:N`` is an IPv6 address, N is the port. Credentials (``user@``) are
    dropped. A missing port is the scheme's default (80, 443 for https)."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "http", url
    scheme = scheme.lower() or "http"
    netloc, slash, path = rest.partition("/")
    path = slash + path
    netloc = netloc.rpartition("@")[2]
    default = 443 if scheme == "https" else 80
    port_text = ""
    if netloc.startswith("["):
        host, _, after = netloc[1:].partition("]")
        if after.startswith(":"):
            port_text = after[1:]
    elif netloc.count(":") > 1:
        head, _, tail = netloc.rpartition(":")
        if tail.isdigit() and _is_ipv6(head):
            host, port_text = head, tail
        else:
            host = netloc               # an IPv6 literal without a port
    else:
        host, _, port_text = netloc.partition(":")
    if port_text:
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise ValueError(f"bad port in URL {url!r}")
        port = int(port_text)
    else:
        port = default
    return scheme, host, port, path


def normalize_url(url: str) -> str:
    """``url`` with its host bracketed when it is IPv6 and its port explicit."""
    scheme, host, port, path = split_url(url)
    return f"{scheme}://{url_host(host)}:{port}{path}"


def gateway_id(public_url: str, location: str | None = None) -> str:
    """This gateway's identity as an owner of services.

    ``INFERGATE_GATEWAY_ID`` when set. With the embedded store the state
    directory is the gateway: its services belong to whichever gateway serves
    that directory, on any port (``<hostname>:<state dir>``). Gateways sharing
    Redis are told apart by ``<hostname>:<port>``.
    """
    explicit = os.environ.get("INFERGATE_GATEWAY_ID")
    if explicit:
        return explicit
    if location is not None:
        from ..registry import is_redis_url

        if not is_redis_url(location):
            return f"{socket.gethostname()}:{os.path.abspath(os.path.expanduser(location))}"
    port = split_url(public_url)[2]
    return f"{socket.gethostname()}:{port}"


def attach_control_plane(app, location, public_url: str, launcher: bool = True):
    """Mount the admin API (and, unless ``launcher=False``, the local launcher) on ``app``.

    Returns the ControlPlane; ``app.start()``/``app.stop()`` start and stop it."""
    from .admin import ControlPlane

    public_url = normalize_url(public_url)
    location = os.fspath(location)
    plane = ControlPlane(app, location, public_url, gateway_id(public_url, location),
                         launcher_enabled=launcher)
    app.admin = plane
    return plane


__all__ = ["attach_control_plane", "gateway_id", "http_url", "url_host", "split_url",
           "normalize_url"]
