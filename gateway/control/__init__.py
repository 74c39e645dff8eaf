"""The control plane: the admin API, service operations and the local launcher.

``attach_control_plane(app, location, public_url)`` mounts it on a GatewayApp
(``app.admin``): ``location`` is the store URL or state directory the gateway
uses, ``public_url`` the gateway's own base URL (``http://host:port``).

Modules: ``services`` (operations over the Store, no HTTP), ``admin`` (the
``/admin/...`` routes), ``launcher`` (local worker processes),
``registration_client`` (how a worker joins: Redis or a gateway's admin API).
"""
from __future__ import annotations

import os
import socket
from urllib.parse import urlsplit


def gateway_id(public_url: str) -> str:
    """This gateway's identity as an owner of services: ``INFERGATE_GATEWAY_ID``, else
    ``<hostname>:<port>`` (stable across restarts on the same port)."""
    explicit = os.environ.get("INFERGATE_GATEWAY_ID")
    if explicit:
        return explicit
    port = urlsplit(public_url).port or 80
    return f"{socket.gethostname()}:{port}"


def attach_control_plane(app, location, public_url: str, launcher: bool = True):
    """Mount the admin API (and, unless ``launcher=False``, the local launcher) on ``app``.

    Returns the ControlPlane; ``app.start()``/``app.stop()`` start and stop it."""
    from .admin import ControlPlane

    plane = ControlPlane(app, os.fspath(location), public_url, gateway_id(public_url),
                         launcher_enabled=launcher)
    app.admin = plane
    return plane


__all__ = ["attach_control_plane", "gateway_id"]
