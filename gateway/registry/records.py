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
RESTARTING = "Restarting"      # a worker crashed; the launcher is starting it again (it still
                               # serves with the instances it has; Failed after repeated crashes)
SERVICE_STATUSES = (CREATING, RUNNING, UPDATING, STOPPED, FAILED, RESTARTING)

DEFAULT_WEIGHT = 100


def parse_bool(value: Any, what: str = "value") -> bool:
    """A strict boolean: True/False, 1/0, or the strings "true"/"false" (any case).
    Anything else (``"no"``, ``"yes"``, ``2``, ``None``) is a ValueError, never
    ``bool("no") == True``."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise ValueError(f"{what} must be true or false, got {value!r}")


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
    revision: int = 1                                # the running version (model + processor)
    history: list = field(default_factory=list)      # previous configs: [{"revision", "config", ...}]
    traffic: dict = field(default_factory=dict)      # target service -> share; {} = own instances
    rules: list = field(default_factory=list)        # header rules, validated elsewhere
    callers: list = field(default_factory=list)      # identified callers: their tokens and
                                                     # ModelArts identities (control/callers.py)
    linked_to: str | None = None                     # blue-green: the original service
    released: bool = False                           # released linked service: no own endpoint
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)
    # Store version: 0 = never stored; the store sets 1, 2, ... on every write and
    # refuses a conditional write (``put_service(rec, expect_version=N)``) made
    # from a copy that is no longer the latest (see Store.put_service).
    version: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ServiceRecord":
        rec = cls(**_known(cls, data))
        rec.revision = int(rec.revision)
        rec.version = int(rec.version or 0)
        rec.traffic = {str(k): int(v) for k, v in (rec.traffic or {}).items()}
        rec.released = parse_bool(rec.released, "released")
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
        rec.healthy = parse_bool(rec.healthy, "healthy")
        rec.registered_at = float(rec.registered_at)
        rec.heartbeat_at = float(rec.heartbeat_at)
        return rec

    def copy(self) -> "InstanceRecord":
        return InstanceRecord.from_dict(self.to_dict())
