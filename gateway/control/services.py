"""Service operations over the Store: what the admin API does, with no HTTP in it.

Every operation validates first and writes last, so a refused request leaves
nothing half-made; a write is durable once its ``await`` returns (the store's
guarantee). Errors are :class:`ServiceError` with the HTTP status to answer
and one line naming the field at fault.

Record conventions (on top of :class:`gateway.registry.ServiceRecord`):

* ``config`` is the service.json as given, minus ``token`` (kept in
  ``record.token``), plus ``metadata.owner``: the id of the gateway whose
  launcher runs the service's workers.
* ``history`` holds every version: ``[{"revision", "config", "created_at"}]``;
  ``revision`` is the current one. A version is a model and a processor
  (``VERSION_KEYS``): a ``modify`` that changes them adds version latest+1 and
  switches to it; one that changes only metadata (instances, limits...)
  changes the running version in place. ``version`` switches to another
  version's model and processor, keeping today's metadata.
* ``callers``: identified callers (control/callers.py), their tokens and
  ModelArts identities, which header rules read as built-ins.
* Blue-green (EAS ``create -r`` / ``release``): the new service is named
  ``<original>_<8 hex>`` with ``linked_to`` = the original. ``release -w N``
  gives it N% of the original's traffic (``original.traffic``) and closes its
  own endpoint (``released``). Deleting the new one gives its share back;
  deleting the original keeps its endpoint as an *entry* (config
  ``{"name", "entry_only": true}``) that sends everything to the linked ones.
* ``traffic`` (ModelArts multi-version): {target service: share}, shares sum
  to 100; ``{}`` means everything to the service's own instances.
"""
from __future__ import annotations

import asyncio
import copy
import glob
import os
import secrets
import time
from dataclasses import dataclass

from ..registry import (CREATING, RESTARTING, RUNNING, STOPPED, UPDATING, ServiceRecord,
                        StoreUnavailable, VersionConflict)
from ..rules import RuleSet
from ..serviceconfig import ConfigError, flat_rpc, processor_kind, validate_service
from . import callers, packages

MAX_HISTORY = 50
LINK_SUFFIX_BYTES = 4  # create -r: <name>_<8 hex digits>
MAX_RETRIES = 50       # compare-and-set rounds before an operation gives up (409)
DELETE = object()      # a mutate() result: delete the record (ServiceOps._update)
SPEC_CACHE_MAX = 4096


class ServiceError(Exception):
    """A refused operation: ``status`` is the HTTP status, ``message`` one line."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


# --------------------------------------------------------------------- config helpers
@dataclass(frozen=True)
class ModelSpec:
    """What the launcher runs for a service: ``infergate worker`` arguments."""
    processor: str           # tensorflow | pytorch | caffe | json | python
    model: str | None        # absolute path of the model file
    entry: str | None        # python processor: FILE.py[:Class]


def owner_of(config: dict) -> str:
    meta = config.get("metadata")
    return str(meta.get("owner") or "") if isinstance(meta, dict) else ""


def is_entry_only(config: dict) -> bool:
    return bool(config.get("entry_only"))


def desired_instances(config: dict) -> int:
    meta = config.get("metadata") or {}
    try:
        return max(0, int(meta.get("instance", 1)))
    except (TypeError, ValueError):
        return 1


def _local_path(field: str, value) -> str:
    """A local path, or where an http(s) package was fetched (NotFetched until then)."""
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{field} must be a non-empty string")
    if packages.is_url(value):
        cache = packages.current()
        local = cache.local(value) if cache is not None else None
        if local is None:
            raise packages.NotFetched(field, value)
        return local
    path = value[len("file://"):] if value.startswith("file://") else value
    if "://" in path or path.startswith("oss:"):
        raise ConfigError(f"{field} {value!r}: give a path on the gateway's machine or an "
                          "http(s) URL (oss is not supported)")
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.exists(path):
        raise ConfigError(f"{field} {value!r} does not exist on the gateway's machine")
    return path


def model_spec(config: dict) -> ModelSpec | None:
    """The worker to launch for ``config``; None when the gateway launches nothing
    (static ``endpoints``, an entry, or a service whose instances register themselves).
    Raises ConfigError naming the field when files are missing or settings clash."""
    if config.get("endpoints") or is_entry_only(config):
        return None
    processor = config.get("processor")
    ptype = str(config.get("processor_type") or "").lower()
    entry = config.get("processor_entry")
    model = config.get("model_path")
    if processor:
        kind = processor_kind(processor)
    elif ptype == "python" or (isinstance(entry, str) and entry.split(":")[0].endswith(".py")):
        kind = "python"
    elif ptype:
        raise ConfigError(f"processor_type {ptype!r} is not supported: use python, or a "
                          "processor (tensorflow, pytorch, caffe, json)")
    elif model is not None:
        kind = "tensorflow"
    else:
        return None  # no model: instances join by themselves (infergate worker --registry)

    model_file = None
    if model is not None:
        model_file = _local_path("model_path", model)
        model_entry = config.get("model_entry")
        if os.path.isdir(model_file):
            if model_entry:
                if not isinstance(model_entry, str):
                    raise ConfigError("model_entry must be a string")
                model_file = os.path.join(model_file, model_entry)
                if not os.path.isfile(model_file):
                    raise ConfigError(f"model_entry {model_entry!r} is not a file in model_path")
            elif kind != "python":
                found = sorted(glob.glob(os.path.join(model_file, "*.onnx")))
                if len(found) != 1:
                    raise ConfigError(f"model_path {model!r} is a directory with {len(found)} .onnx "
                                      "files: name the model file with model_entry")
                model_file = found[0]
    entry_spec = None
    if kind == "python":
        if not entry and model_file is None:
            raise ConfigError("processor_entry is required for a python processor")
        if entry:
            if not isinstance(entry, str):
                raise ConfigError("processor_entry must be a string")
            file_part, colon, cls = entry.partition(":")
            ppath = config.get("processor_path")
            if ppath:
                base = _local_path("processor_path", ppath)
                if os.path.isdir(base):
                    file_part = os.path.join(base, file_part)
                elif not file_part:
                    file_part = base
            if not os.path.isfile(os.path.abspath(os.path.expanduser(file_part))):
                raise ConfigError(f"processor_entry {entry!r} does not exist on the gateway's "
                                  "machine")
            entry_spec = os.path.abspath(os.path.expanduser(file_part)) + (colon + cls)
    elif model_file is None:
        raise ConfigError(f"model_path is required for processor {processor!r} (or give "
                          "endpoints for servers that run elsewhere)")
    return ModelSpec(kind, model_file, entry_spec)


_spec_cache: dict = {}


def cached_model_spec(rec: ServiceRecord) -> ModelSpec | None:
    """``model_spec(rec.config)``, computed once per stored version of the record.

    The launcher asks on every tick and ``list``/``desc`` for every service;
    model_spec looks at the filesystem each time. A record's config cannot change
    without a new store version, so (name, created_at, version) identifies it;
    ConfigError is cached too and raised again. Records never stored (version 0)
    are not cached."""
    if not rec.version:
        return model_spec(rec.config)
    key = (rec.name, rec.created_at, rec.version)
    hit = _spec_cache.get(key)
    if hit is None:
        try:
            hit = (model_spec(rec.config), None)
        except ConfigError as exc:
            hit = (None, exc)
        if len(_spec_cache) >= SPEC_CACHE_MAX:
            _spec_cache.clear()
        _spec_cache[key] = hit
    spec, error = hit
    if error is not None:
        raise ConfigError(str(error))
    return spec


# What check_config gives for a package the launcher has still to fetch: something to run.
FETCHING = ModelSpec("fetching", None, None)


def check_config(config) -> ModelSpec | None:
    """validate_service + model files; ServiceError(400) naming the field."""
    try:
        validate_service(config)
        return model_spec(config)
    except packages.NotFetched:
        return FETCHING
    except ConfigError as exc:
        raise ServiceError(400, str(exc)) from None


def _request_format(config: dict) -> str:
    """The request format a service's clients send (its processor), or "any" for servers
    fronted by static endpoints, whose format infergate does not know."""
    if config.get("endpoints"):
        return "any"
    try:
        return processor_kind(config.get("processor", "tensorflow"))
    except ConfigError:
        return "any"


def deep_merge(base: dict, patch: dict) -> dict:
    """Merge ``patch`` into ``base`` in place: objects merge key by key, the rest replaces."""
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            deep_merge(base[key], value)
        else:
            base[key] = copy.deepcopy(value)
    return base


# What a version is: a new model or processor (or their configuration) makes one;
# instances, rate limits and other metadata change the running version.
VERSION_KEYS = ("model_path", "model_entry", "model_config", "processor", "processor_path",
                "processor_entry", "processor_type")


def version_of(config: dict, present_only: bool = False) -> dict:
    return {k: config.get(k) for k in VERSION_KEYS if not present_only or k in config}


def _flat_rpc(metadata: dict) -> dict:
    """serviceconfig.flat_rpc, its refusal a 400."""
    try:
        return flat_rpc(metadata)
    except ConfigError as exc:
        raise ServiceError(400, str(exc)) from None


def set_dotted(config: dict, key: str, value) -> None:
    """``-Dmetadata.instance=3``: set a dotted path, creating objects on the way.

    Under ``metadata`` the rest of the path is one key when it starts with
    ``rpc.`` (``metadata.rpc.keepalive`` -> metadata["rpc.keepalive"]), as in the
    EAS manual."""
    parts = [p for p in key.split(".")]
    if not key or any(not p for p in parts):
        raise ServiceError(400, f"-D {key!r}: not a dotted key such as metadata.instance")
    if parts[0] == "metadata" and len(parts) > 2 and parts[1] == "rpc":
        parts = ["metadata", ".".join(parts[1:])]
    if parts[0] == "name":
        raise ServiceError(400, "name cannot be changed")
    node = config
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise ServiceError(400, f"-D {key}: {'.'.join(parts[:i + 1])} is not an object")
        node = child
    node[parts[-1]] = copy.deepcopy(value)


def _rescale(shares: dict, total: int) -> dict:
    """Integer shares proportional to ``shares`` summing to ``total`` (largest remainder)."""
    out = {k: 0 for k in shares}
    weight = sum(max(0, int(v)) for v in shares.values())
    if total <= 0 or weight <= 0:
        return out
    exact = {k: max(0, int(v)) * total / weight for k, v in shares.items()}
    for k, v in exact.items():
        out[k] = int(v)
    left = total - sum(out.values())
    for k in sorted(exact, key=lambda k: exact[k] - int(exact[k]), reverse=True)[:left]:
        out[k] += 1
    return out


def effective_traffic(rec: ServiceRecord) -> dict:
    return dict(rec.traffic) if rec.traffic else {rec.name: 100}


def _normalized_traffic(name: str, traffic: dict) -> dict:
    """{} when everything goes to the service itself."""
    live = {k: v for k, v in traffic.items() if v > 0}
    return {} if list(live) == [name] and live[name] == 100 else traffic


# --------------------------------------------------------------------- operations
class ServiceOps:
    """The control-plane operations of one gateway over its store.

    Several gateways (or ``--processes``) may share the store, so no in-process
    lock makes an operation safe: each one is a read-modify-write of the latest
    record that the store writes only if the record is still at the version it
    read (compare-and-set); on a conflict the operation reads again and redoes
    its change, re-checking everything it checked the first time. Status
    updates of the launcher go the same way and touch only ``status`` and
    ``message``, so they never undo a user's change nor bring back a deleted
    service."""

    def __init__(self, store, owner: str):
        self.store = store
        self.owner = owner

    # ---- plumbing -------------------------------------------------------------
    async def _put(self, rec: ServiceRecord) -> ServiceRecord:
        """Write ``rec`` if the stored record is still at ``rec.version`` (0: absent);
        VersionConflict otherwise."""
        rec.updated_at = time.time()
        await self.store.put_service(rec, expect_version=rec.version)
        return rec

    async def _update(self, name: str, mutate, missing_ok: bool = False):
        """Read-modify-write of one record, retried on conflict.

        ``mutate(rec)`` (a coroutine function) changes the fresh copy it gets and
        returns it to be written, None to write nothing, or DELETE to delete the
        record; it may raise ServiceError. Returns the record as written (or as
        read when nothing was written; None when deleted, or when it does not
        exist and ``missing_ok``)."""
        for _ in range(MAX_RETRIES):
            rec = await self.store.get_service(name)
            if rec is None:
                if missing_ok:
                    return None
                raise ServiceError(404, f"service {name!r} does not exist")
            version = rec.version
            result = await mutate(rec)
            try:
                if result is None:
                    return rec
                if result is DELETE:
                    await self.store.delete_service(name, expect_version=version)
                    return None
                result.version = version
                return await self._put(result)
            except VersionConflict:
                await asyncio.sleep(0)
                continue
        raise _busy(name)

    # ---- reads ----------------------------------------------------------------
    async def get(self, name: str) -> ServiceRecord:
        rec = await self.store.get_service(name)
        if rec is None:
            raise ServiceError(404, f"service {name!r} does not exist")
        return rec

    async def list(self) -> list[ServiceRecord]:
        return await self.store.list_services()

    # ---- create ---------------------------------------------------------------
    async def create(self, config, linked: bool = False) -> ServiceRecord:
        if not isinstance(config, dict):
            raise ServiceError(400, "service.json must be a JSON object")
        config = copy.deepcopy(config)
        spec = check_config(config)
        if config.get("entry_only"):
            raise ServiceError(400, "entry_only is reserved for the endpoint of a deleted "
                                    "original service")
        name = config["name"]
        original = None
        if linked:
            original = await self.store.get_service(name)
            if original is None:
                raise ServiceError(404, f"service {name!r} does not exist: create -r makes a "
                                        "new service linked to an existing one of that name")
            if original.linked_to:  # link to the root, whose endpoint never changes
                original = await self.get(original.linked_to)
        token = config.pop("token", "") or ""
        if not token and str(config.get("generate_token", "false")).lower() == "true":
            token = secrets.token_urlsafe(24)
        meta = config.setdefault("metadata", {})
        meta = config["metadata"] = _flat_rpc(meta)
        meta.setdefault("owner", self.owner)
        for _ in range(MAX_RETRIES):
            if original is not None:
                name = f"{original.name}_{secrets.token_hex(LINK_SUFFIX_BYTES)}"
                config["name"] = name
            now = time.time()
            rec = ServiceRecord(
                name=name, config=config, token=token,
                status=CREATING if spec is not None else RUNNING,
                message=("starting %d instance(s)" % desired_instances(config)) if spec
                else "serving static endpoints" if config.get("endpoints")
                else "instances register themselves (infergate worker --registry)",
                revision=1, history=[{"revision": 1, "config": copy.deepcopy(config),
                                      "created_at": now}],
                linked_to=original.name if original is not None else None,
                created_at=now, version=0)
            try:
                return await self._put(rec)       # version 0: only if no such record yet
            except VersionConflict:
                if original is None:
                    raise ServiceError(409, f"service {name!r} already exists (use modify to "
                                            "change it, or create -r for a blue-green version)"
                                       ) from None
                # a linked name that is taken: draw another suffix
        raise _busy(name)

    # ---- modify / version -----------------------------------------------------
    def _status_after_change(self, rec: ServiceRecord, spec, what: str) -> None:
        if rec.status == STOPPED:
            return
        if spec is not None:
            rec.status, rec.message = UPDATING, what
        else:
            rec.status, rec.message = RUNNING, what

    async def modify(self, name: str, patch: dict | None = None,
                     sets: dict | None = None) -> ServiceRecord:
        if patch is not None and not isinstance(patch, dict):
            raise ServiceError(400, "the partial service.json must be a JSON object")
        if sets is not None and not isinstance(sets, dict):
            raise ServiceError(400, "set must be an object of dotted keys and values")
        if not patch and not sets:
            raise ServiceError(400, "nothing to modify: give -D key=value or -s partial.json")

        async def mutate(rec: ServiceRecord):
            if is_entry_only(rec.config):
                raise ServiceError(400, f"service {name!r} was deleted; its endpoint only forwards "
                                        "to its linked services")
            config = copy.deepcopy(rec.config)
            config["metadata"] = _flat_rpc(config.get("metadata") or {})
            token = rec.token
            if patch:
                p = copy.deepcopy(patch)
                if p.get("name", name) != name:
                    raise ServiceError(400, f"name cannot be changed ({p['name']!r} given for "
                                            f"{name!r})")
                if isinstance(p.get("metadata"), dict):
                    p["metadata"] = _flat_rpc(p["metadata"])
                if "token" in p:
                    token = p.pop("token")
                    if not isinstance(token, str):
                        raise ServiceError(400, "token must be a string")
                deep_merge(config, p)
            for key, value in (sets or {}).items():
                if key == "token":
                    if value is None:  # -Dtoken=null: no token
                        value = ""
                    elif not isinstance(value, str):
                        value = str(value)
                    token = value
                    continue
                set_dotted(config, key, value)
            if not token and str(config.get("generate_token", "false")).lower() == "true":
                token = secrets.token_urlsafe(24)
            if config.get("entry_only"):
                raise ServiceError(400, "entry_only is reserved for the endpoint of a deleted "
                                        "original service")
            spec = check_config(config)
            if config == rec.config and token == rec.token:
                return None  # nothing changes: no new version
            before = desired_instances(rec.config)
            after = desired_instances(config)
            only_scale = ({**config, "metadata": {**config["metadata"], "instance": 0}} ==
                          {**rec.config, "metadata": {**(rec.config.get("metadata") or {}),
                                                      "instance": 0}} and token == rec.token)
            if version_of(config) == version_of(rec.config):
                # Instances, limits, other metadata: the running version changes in place.
                for entry in rec.history:
                    if entry.get("revision") == rec.revision:
                        entry["config"] = copy.deepcopy(config)
                rec.config, rec.token = config, token
                what = (f"scaling from {before} to {after} instance(s)" if only_scale
                        else f"updating version {rec.revision}")
                self._status_after_change(rec, spec, what)
                return rec
            latest = max([h.get("revision", 0) for h in rec.history] + [rec.revision])
            rec.history.append({"revision": latest + 1, "config": copy.deepcopy(config),
                                "created_at": time.time()})
            if len(rec.history) > MAX_HISTORY:
                rec.history = rec.history[-MAX_HISTORY:]
            rec.config, rec.token, rec.revision = config, token, latest + 1
            what = f"updating to version {latest + 1}"
            self._status_after_change(rec, spec, what)
            return rec

        return await self._update(name, mutate)

    async def version(self, name: str, revision) -> ServiceRecord:
        try:
            revision = int(revision)
        except (TypeError, ValueError):
            raise ServiceError(400, f"version must be an integer, got {revision!r}") from None

        async def mutate(rec: ServiceRecord):
            entry = next((h for h in rec.history if h.get("revision") == revision), None)
            if entry is None:
                known = ", ".join(str(h.get("revision")) for h in rec.history)
                raise ServiceError(404, f"service {name!r} has no version {revision} "
                                        f"(versions: {known})")
            if revision == rec.revision:
                return None
            # A version is its model and processor: the rest (instances, limits...) stays.
            config = copy.deepcopy(rec.config)
            for key in VERSION_KEYS:
                config.pop(key, None)
            config.update(copy.deepcopy(version_of(entry["config"], present_only=True)))
            spec = check_config(config)
            rec.config, rec.revision = config, revision
            self._status_after_change(rec, spec, f"switching to version {revision}")
            return rec

        return await self._update(name, mutate)

    # ---- stop / start ---------------------------------------------------------
    async def stop(self, name: str) -> ServiceRecord:
        async def mutate(rec: ServiceRecord):
            if is_entry_only(rec.config):
                raise ServiceError(400, f"service {name!r} was deleted; stop its linked services")
            if rec.status == STOPPED:
                return None
            rec.status, rec.message = STOPPED, "stopped"
            return rec

        return await self._update(name, mutate)

    async def start(self, name: str) -> ServiceRecord:
        async def mutate(rec: ServiceRecord):
            if is_entry_only(rec.config):
                raise ServiceError(400, f"service {name!r} was deleted; start its linked services")
            if rec.status in (RUNNING, CREATING, UPDATING, RESTARTING):
                return None
            spec = check_config(rec.config)
            if spec is not None:
                rec.status = CREATING
                rec.message = "starting %d instance(s)" % desired_instances(rec.config)
            else:
                rec.status, rec.message = RUNNING, "started"
            return rec

        return await self._update(name, mutate)

    # ---- delete ---------------------------------------------------------------
    async def delete(self, name: str) -> dict:
        """Returns {"deleted": name, "kept_entry": bool, "traffic_to": [...]}."""
        result = {"deleted": name, "kept_entry": False, "traffic_to": []}
        for _ in range(MAX_RETRIES):
            rec = await self.get(name)
            records = {r.name: r for r in await self.store.list_services()}
            linked = sorted(n for n, r in records.items() if r.linked_to == name)
            if linked and not is_entry_only(rec.config):
                # The original goes, its endpoint stays: everything to the linked services.
                others = {k: v for k, v in effective_traffic(rec).items()
                          if k != name and k in records}
                traffic = _rescale(others, 100)
                if sum(traffic.values()) == 0:
                    traffic = _rescale({n: 1 for n in linked}, 100)
                entry = ServiceRecord(
                    name=name, config={"name": name, "entry_only": True,
                                       "metadata": {"owner": owner_of(rec.config)}},
                    token=rec.token, status=RUNNING,
                    message="the original service was deleted; this endpoint forwards to "
                            + ", ".join(k for k, v in traffic.items() if v > 0),
                    revision=rec.revision, history=rec.history, traffic=traffic,
                    rules=[r for r in rec.rules if r.get("target") != name],
                    created_at=rec.created_at, version=rec.version)
                try:
                    await self._put(entry)
                except VersionConflict:
                    continue
                result.update(kept_entry=True, traffic_to=[k for k, v in traffic.items() if v])
                # Its own instances are gone: nobody else may send a share or a rule there.
                await self._drop_references(name)
                return result
            try:
                await self.store.delete_service(name, expect_version=rec.version)
            except VersionConflict:
                continue
            if is_entry_only(rec.config):
                await self._unlink_children(name)
            result["traffic_to"] = await self._drop_references(name)
            return result
        raise _busy(name)

    async def _unlink_children(self, name: str) -> None:
        """The entry ``name`` is gone: services linked to it get their own endpoint back."""
        for child in await self.store.list_services():
            if child.linked_to != name:
                continue

            async def unlink(rec: ServiceRecord):
                if rec.linked_to != name:
                    return None
                rec.linked_to, rec.released = None, False
                return rec

            await self._update(child.name, unlink, missing_ok=True)

    async def _drop_references(self, name: str) -> list[str]:
        """``name`` has no instances of its own any more (deleted, or kept only as an
        entry): take it out of every other service's traffic shares and rules.
        An entry left with nothing to forward to is deleted too. Returns where the
        traffic of the last service that sent some to ``name`` goes now."""
        traffic_to: list[str] = []
        emptied: list[str] = []
        for other in await self.store.list_services():
            if other.name == name:
                continue
            if name not in other.traffic and not any(r.get("target") == name
                                                     for r in other.rules):
                continue

            async def drop(rec: ServiceRecord):
                kept_rules = [r for r in rec.rules if r.get("target") != name]
                if name not in rec.traffic:
                    if len(kept_rules) == len(rec.rules):
                        return None
                    rec.rules = kept_rules
                    return rec
                rec.rules = kept_rules
                entry = is_entry_only(rec.config)
                rest = {k: v for k, v in rec.traffic.items() if k != name}
                if not rest or (entry and not any(k != rec.name for k in rest)):
                    rest = {}
                elif sum(rest.values()) == 0:
                    rest = {rec.name: 100} if not entry else _rescale({k: 1 for k in rest}, 100)
                else:
                    rest = _rescale(rest, 100)
                if entry and not any(v for v in rest.values()):
                    return DELETE  # an entry with nothing left to forward to goes too
                rec.traffic = _normalized_traffic(rec.name, rest)
                return rec

            updated = await self._update(other.name, drop, missing_ok=True)
            if updated is None:
                if await self.store.get_service(other.name) is None and is_entry_only(
                        other.config):
                    emptied.append(other.name)
            elif name in other.traffic:
                traffic_to = [k for k, v in effective_traffic(updated).items() if v]
        for gone in emptied:  # what pointed at a removed entry (nothing should) goes too
            await self._unlink_children(gone)
            await self._drop_references(gone)
        return traffic_to

    # ---- blue-green release ---------------------------------------------------
    async def release(self, name: str, weight) -> ServiceRecord:
        if isinstance(weight, bool) or weight is None:
            raise ServiceError(400, "weight must be an integer from 0 to 100")
        try:
            weight = int(weight)
        except (TypeError, ValueError):
            raise ServiceError(400, f"weight must be an integer from 0 to 100, got {weight!r}") \
                from None
        if not 0 <= weight <= 100:
            raise ServiceError(400, f"weight must be an integer from 0 to 100, got {weight}")
        rec = await self.get(name)
        if not rec.linked_to:
            raise ServiceError(400, f"service {name!r} is not a linked service: release works "
                                    "on a service made with create -r")
        original_name = rec.linked_to

        async def shift(original: ServiceRecord):
            others = {k: v for k, v in effective_traffic(original).items() if k != name}
            if sum(others.values()) == 0 and weight < 100:
                fallback = original.name
                if is_entry_only(original.config):
                    fallback = next((k for k in others), None)
                if fallback is None:
                    raise ServiceError(400, f"nothing else takes {original.name!r}'s traffic: "
                                            "release with -w 100")
                others[fallback] = 1
            traffic = _rescale(others, 100 - weight)
            traffic[name] = weight
            if traffic == effective_traffic(original):
                return None
            original.traffic = traffic
            return original

        try:
            original = await self._update(original_name, shift)
        except ServiceError as exc:
            if exc.status == 404:
                raise ServiceError(404, f"the original service {original_name!r} of {name!r} no "
                                        "longer exists") from None
            raise

        async def mark(linked: ServiceRecord):
            if linked.linked_to != original_name:
                raise ServiceError(409, f"service {name!r} is no longer linked to "
                                        f"{original_name!r}")
            if linked.released:
                return None
            linked.released = True
            linked.message = f"released into {original_name} at {weight}%"
            return linked

        try:
            await self._update(name, mark)
        except ServiceError:
            # Deleted (or unlinked) while we shifted traffic to it: take that back.
            await self._drop_references(name)
            raise
        return original

    # ---- ModelArts: traffic shares and header rules ---------------------------
    async def _check_target(self, name: str, target: str, what: str) -> ServiceRecord:
        other = await self.store.get_service(target)
        if other is None:
            raise ServiceError(400, f"{what} {target!r} is not a service")
        if is_entry_only(other.config):
            raise ServiceError(400, f"{what} {target!r} was deleted: its endpoint only forwards "
                                    "to its linked services and has no instances")
        mine = await self.store.get_service(name)
        if mine is not None:
            theirs, ours = _request_format(other.config), _request_format(mine.config)
            if "any" not in (theirs, ours) and theirs != ours:
                raise ServiceError(400, f"{what} {target!r} takes {theirs} requests, but "
                                        f"clients of {name!r} send {ours}: a version must "
                                        "speak the same format")
        return other

    async def _recheck_targets(self, name: str, targets) -> None:
        """After writing shares/rules: a target deleted meanwhile must not stay in them."""
        for target in set(targets):
            if target == name:
                continue
            other = await self.store.get_service(target)
            if other is None or is_entry_only(other.config):
                await self._drop_references(target)

    async def set_traffic(self, name: str, shares) -> ServiceRecord:
        if not isinstance(shares, dict) or not shares:
            raise ServiceError(400, "traffic must be an object of {service: share}")
        clean = {}
        for target, share in shares.items():
            if isinstance(share, bool):
                raise ServiceError(400, f"traffic share of {target!r} must be an integer")
            try:
                value = int(share)
                if isinstance(share, float) and share != value:
                    raise ValueError
            except (TypeError, ValueError):
                raise ServiceError(400, f"traffic share of {target!r} must be an integer from 0 "
                                        f"to 100, got {share!r}") from None
            if not 0 <= value <= 100:
                raise ServiceError(400, f"traffic share of {target!r} must be from 0 to 100, "
                                        f"got {value}")
            clean[str(target)] = value
        total = sum(clean.values())
        if total != 100:
            raise ServiceError(400, f"traffic shares must sum to 100, got {total}")

        async def mutate(rec: ServiceRecord):
            if rec.linked_to and rec.released:
                raise ServiceError(400, f"service {name!r} is released into {rec.linked_to!r}: "
                                        f"set the traffic of {rec.linked_to!r}")
            for target in clean:
                if target == name:
                    if is_entry_only(rec.config) and clean[target]:
                        raise ServiceError(400, f"service {name!r} was deleted: it has no "
                                                "instances to take a share")
                    continue
                other = await self._check_target(name, target, "traffic target")
                if other.linked_to and other.linked_to != name and other.released:
                    raise ServiceError(400, f"traffic target {target!r} is released into "
                                            f"{other.linked_to!r}")
            traffic = _normalized_traffic(name, clean)
            if traffic == rec.traffic:
                return None
            rec.traffic = traffic
            return rec

        rec = await self._update(name, mutate)
        await self._recheck_targets(name, clean)
        return rec

    async def set_rules(self, name: str, rules) -> ServiceRecord:
        if isinstance(rules, dict) and "rules" in rules:
            rules = rules["rules"]
        try:
            ruleset = RuleSet(rules if rules is not None else [])
        except ValueError as exc:  # RuleSyntaxError included: names the rule and position
            raise ServiceError(400, str(exc)) from None

        async def mutate(rec: ServiceRecord):
            if ruleset.builtin_uses and not rec.callers:
                index, builtin = next(iter(ruleset.builtin_uses.items()))
                raise ServiceError(400, f"rule {index} reads #{builtin}, but service {name!r} "
                                        "has no identified callers, so it could never hold: add "
                                        f"one first (infergate callers {name} add --user-name "
                                        "...)")
            for i, target in enumerate(ruleset.targets):
                if target == name:
                    if is_entry_only(rec.config):
                        raise ServiceError(400, f"rule {i}: service {name!r} was deleted: it "
                                                "has no instances of its own")
                    continue
                await self._check_target(name, target, f"rule {i}: target")
            if ruleset.rules == rec.rules:
                return None
            rec.rules = ruleset.rules
            return rec

        rec = await self._update(name, mutate)
        await self._recheck_targets(name, ruleset.targets)
        return rec

    # ---- identified callers (control/callers.py) -------------------------------
    async def add_caller(self, name: str, data) -> dict:
        """Add a caller; returns it, token included."""
        added = {}

        async def mutate(rec: ServiceRecord):
            try:
                caller = callers.checked(data, rec.callers)
            except callers.CallerError as exc:
                raise ServiceError(400, str(exc)) from None
            rec.callers = rec.callers + [caller]
            added.update(caller)
            return rec

        await self._update(name, mutate)
        return added

    async def remove_caller(self, name: str, who: str) -> None:
        """Remove the callers whose token or user name is `who`."""
        async def mutate(rec: ServiceRecord):
            kept = [c for c in rec.callers if who not in (c["token"], c.get("user_name"))]
            if len(kept) == len(rec.callers):
                raise ServiceError(404, f"service {name!r} has no caller {who!r}")
            if not kept and RuleSet(rec.rules).builtin_uses:
                raise ServiceError(400, f"service {name!r} has rules on caller built-ins: "
                                        "remove them before its last caller")
            rec.callers = kept
            return rec

        await self._update(name, mutate)

    # ---- used by the launcher -------------------------------------------------
    async def set_status(self, name: str, status: str, message: str,
                         revision: int | None = None) -> ServiceRecord | None:
        """Set status/message of the latest record -- and nothing else -- unless the
        user stopped the service or changed its version meanwhile (``revision``: the
        version the caller acted on). None when the service no longer exists."""
        async def mutate(rec: ServiceRecord):
            if rec.status == STOPPED and status != STOPPED:
                return None
            if revision is not None and rec.revision != revision:
                return None
            if rec.status == status and rec.message == message:
                return None
            rec.status, rec.message = status, message
            return rec

        return await self._update(name, mutate, missing_ok=True)

    async def claim(self, name: str) -> ServiceRecord | None:
        """Become the owner of a service that has none (records written by older tools)."""
        async def mutate(rec: ServiceRecord):
            if owner_of(rec.config):
                return None
            rec.config.setdefault("metadata", {})["owner"] = self.owner
            return rec

        return await self._update(name, mutate, missing_ok=True)


def _busy(name: str) -> ServiceError:
    return ServiceError(409, f"service {name!r} kept changing while this change was being made "
                             "(other gateways are writing it); nothing was changed, try again")


__all__ = ["ServiceOps", "ServiceError", "ModelSpec", "model_spec", "cached_model_spec",
           "check_config", "deep_merge", "set_dotted", "owner_of", "is_entry_only",
           "desired_instances", "effective_traffic", "StoreUnavailable"]
