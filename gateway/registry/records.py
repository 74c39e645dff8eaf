"""Control-plane records: plain, JSON-serializable dataclasses.

Both stores persist exactly ``to_dict()`` and rebuild with ``from_dict()``;
``from_dict`` ignores keys it does not know (a newer gateway may have written
them) and fills defaults for missing ones (an older one may have written it).
"""
from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any

# Service lifecycle states (EAS names).
CREATING = "Creating"
RUNNING = "Running"
UPDATING = "Updating"
STOPPED = "Stopped"
FAILED = "Failed"
SERVICE_STATUSES = (CREATING, RUNNING, UPDATING, STOPPED, FAILED)

DEFAULT_WEIGHT = 100


def _known(cls, data: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: copy.deepcopy(v) for k, v in data.items() if k in names}


@dataclass
class ServiceRecord:
    name: str
    config: dict = field(default_factory=dict)      # service.json as given, metadata included
    token: str = ""                                  # "" = no auth
    status: str = CREATING
    message: str = ""
    revision: int = 1                                # config revision, +1 per modify
    history: list = field(default_factory=list)      # previous configs: [{"revision", "config", ...}]
    traffic: dict = field(default_factory=dict)      # target service -> share; {} = own instances
    rules: list = field(default_factory=list)        # header rules, validated elsewhere
    linked_to: str | None = None                     # blue-green: the original service
    released: bool = False                           # released linked service: no own endpoint
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ServiceRecord":
        rec = cls(**_known(cls, data))
        rec.revision = int(rec.revision)
        rec.traffic = {str(k): int(v) for k, v in (rec.traffic or {}).items()}
        rec.released = bool(rec.released)
        rec.created_at = float(rec.created_at)
        rec.updated_at = float(rec.updated_at)
        return rec

    def copy(self) -> "ServiceRecord":
        return ServiceRecord.from_dict(self.to_dict())


@dataclass
class InstanceRecord:
    service: str
    instance_id: str = ""                            # unique within the service; "" -> "ip:port"
    ip: str = ""
    port: int = 0
    weight: int = DEFAULT_WEIGHT                     # 0 = draining
    healthy: bool = True
    registered_at: float = field(default_factory=time.time)
    heartbeat_at: float = field(default_factory=time.time)
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.instance_id:
            self.instance_id = f"{self.ip}:{self.port}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "InstanceRecord":
        rec = cls(**_known(cls, data))
        rec.port = int(rec.port)
        rec.weight = int(rec.weight)
        rec.healthy = bool(rec.healthy)
        rec.registered_at = float(rec.registered_at)
        rec.heartbeat_at = float(rec.heartbeat_at)
        return rec

    def copy(self) -> "InstanceRecord":
        return InstanceRecord.from_dict(self.to_dict())
