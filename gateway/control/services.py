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
  ``revision`` is the current one. ``modify`` adds version latest+1 and
  switches to it; ``version`` switches to an older (or newer) one.
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

from ..registry import (CREATING, FAILED, RUNNING, STOPPED, UPDATING, ServiceRecord,
                        StoreUnavailable)
from ..rules import RuleSet
from ..serviceconfig import ConfigError, processor_kind, validate_service

MAX_HISTORY = 50
LINK_SUFFIX_BYTES = 4  # create -r: <name>_<8 hex digits>


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
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{field} must be a non-empty string")
    path = value[len("file://"):] if value.startswith("file://") else value
    if "://" in path or path.startswith("oss:"):
        raise ConfigError(f"{field} {value!r}: only paths on the gateway's machine are supported "
                          "(no http or oss downloads); copy the file there first")
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


def check_config(config) -> ModelSpec | None:
    """validate_service + model files; ServiceError(400) naming the field."""
    try:
        validate_service(config)
        return model_spec(config)
    except ConfigError as exc:
        raise ServiceError(400, str(exc)) from None


def deep_merge(base: dict, patch: dict) -> dict:
    """Merge ``patch`` into ``base`` in place: objects merge key by key, the rest replaces."""
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            deep_merge(base[key], value)
        else:
            base[key] = copy.deepcopy(value)
    return base


def _flat_rpc(metadata: dict) -> dict:
    """metadata with a nested "rpc" object written as flat "rpc.<key>" keys (EAS style),
    so that merges and -D settings meet the same key."""
    nested = metadata.get("rpc")
    if isinstance(nested, dict):
        metadata = dict(metadata)
        del metadata["rpc"]
        for key, value in nested.items():
            metadata[f"rpc.{key}"] = value
    return metadata


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
    """The control-plane operations of one gateway over its store."""

    def __init__(self, store, owner: str):
        self.store = store
        self.owner = owner
        self._lock = asyncio.Lock()

    # ---- reads ----------------------------------------------------------------
    async def get(self, name: str) -> ServiceRecord:
        rec = await self.store.get_service(name)
        if rec is None:
            raise ServiceError(404, f"service {name!r} does not exist")
        return rec

    async def list(self) -> list[ServiceRecord]:
        return await self.store.list_services()

    async def _put(self, rec: ServiceRecord) -> ServiceRecord:
        rec.updated_at = time.time()
        await self.store.put_service(rec)
        return rec

    # ---- create ---------------------------------------------------------------
    async def create(self, config, linked: bool = False) -> ServiceRecord:
        if not isinstance(config, dict):
            raise ServiceError(400, "service.json must be a JSON object")
        config = copy.deepcopy(config)
        spec = check_config(config)
        if config.get("entry_only"):
            raise ServiceError(400, "entry_only is reserved for the endpoint of a deleted "
                                    "original service")
        async with self._lock:
            name = config["name"]
            original = None
            if linked:
                original = await self.store.get_service(name)
                if original is None:
                    raise ServiceError(404, f"service {name!r} does not exist: create -r makes a "
                                            "new service linked to an existing one of that name")
                if original.linked_to:  # link to the root, whose endpoint never changes
                    original = await self.get(original.linked_to)
                for _ in range(10):
                    name = f"{original.name}_{secrets.token_hex(LINK_SUFFIX_BYTES)}"
                    if await self.store.get_service(name) is None:
                        break
                config["name"] = name
            elif await self.store.get_service(name) is not None:
                raise ServiceError(409, f"service {name!r} already exists (use modify to change "
                                        "it, or create -r for a blue-green version)")
            token = config.pop("token", "") or ""
            if not token and str(config.get("generate_token", "false")).lower() == "true":
                token = secrets.token_urlsafe(24)
            meta = config.setdefault("metadata", {})
            meta = config["metadata"] = _flat_rpc(meta)
            meta.setdefault("owner", self.owner)
            now = time.time()
            rec = ServiceRecord(
                name=name, config=config, token=token,
                status=CREATING if spec is not None else RUNNING,
                message=("starting %d instance(s)" % desired_instances(config)) if spec
                else "serving static endpoints" if config.get("endpoints")
                else "instances register themselves (infergate worker --registry)",
                revision=1, history=[{"revision": 1, "config": copy.deepcopy(config),
                                      "created_at": now}],
                linked_to=original.name if original is not None else None)
            return await self._put(rec)

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
        async with self._lock:
            rec = await self.get(name)
            if is_entry_only(rec.config):
                raise ServiceError(400, f"service {name!r} was deleted; its endpoint only forwards "
                                        "to its linked services")
            config = copy.deepcopy(rec.config)
            config["metadata"] = _flat_rpc(config.get("metadata") or {})
            token = rec.token
            if patch:
                patch = copy.deepcopy(patch)
                if patch.get("name", name) != name:
                    raise ServiceError(400, f"name cannot be changed ({patch['name']!r} given for "
                                            f"{name!r})")
                if isinstance(patch.get("metadata"), dict):
                    patch["metadata"] = _flat_rpc(patch["metadata"])
                if "token" in patch:
                    token = patch.pop("token")
                    if not isinstance(token, str):
                        raise ServiceError(400, "token must be a string")
                deep_merge(config, patch)
            for key, value in (sets or {}).items():
                if key == "token":
                    if not isinstance(value, str):
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
                return rec  # nothing changes: no new version
            before = desired_instances(rec.config)
            after = desired_instances(config)
            only_scale = ({**config, "metadata": {**config["metadata"], "instance": 0}} ==
                          {**rec.config, "metadata": {**(rec.config.get("metadata") or {}),
                                                      "instance": 0}} and token == rec.token)
            latest = max([h.get("revision", 0) for h in rec.history] + [rec.revision])
            rec.history.append({"revision": latest + 1, "config": copy.deepcopy(config),
                                "created_at": time.time()})
            if len(rec.history) > MAX_HISTORY:
                rec.history = rec.history[-MAX_HISTORY:]
            rec.config, rec.token, rec.revision = config, token, latest + 1
            what = (f"scaling from {before} to {after} instance(s)" if only_scale
                    else f"updating to version {latest + 1}")
            self._status_after_change(rec, spec, what)
            return await self._put(rec)

    async def version(self, name: str, revision) -> ServiceRecord:
        try:
            revision = int(revision)
        except (TypeError, ValueError):
            raise ServiceError(400, f"version must be an integer, got {revision!r}") from None
        async with self._lock:
            rec = await self.get(name)
            entry = next((h for h in rec.history if h.get("revision") == revision), None)
            if entry is None:
                known = ", ".join(str(h.get("revision")) for h in rec.history)
                raise ServiceError(404, f"service {name!r} has no version {revision} "
                                        f"(versions: {known})")
            if revision == rec.revision:
                return rec
            config = copy.deepcopy(entry["config"])
            owner = owner_of(rec.config)
            if owner:
                config.setdefault("metadata", {})["owner"] = owner
            spec = check_config(config)
            rec.config, rec.revision = config, revision
            self._status_after_change(rec, spec, f"switching to version {revision}")
            return await self._put(rec)

    # ---- stop / start ---------------------------------------------------------
    async def stop(self, name: str) -> ServiceRecord:
        async with self._lock:
            rec = await self.get(name)
            if is_entry_only(rec.config):
                raise ServiceError(400, f"service {name!r} was deleted; stop its linked services")
            if rec.status == STOPPED:
                return rec
            rec.status, rec.message = STOPPED, "stopped"
            return await self._put(rec)

    async def start(self, name: str) -> ServiceRecord:
        async with self._lock:
            rec = await self.get(name)
            if is_entry_only(rec.config):
                raise ServiceError(400, f"service {name!r} was deleted; start its linked services")
            if rec.status in (RUNNING, CREATING, UPDATING):
                return rec
            spec = check_config(rec.config) if rec.status == FAILED else model_spec(rec.config)
            if spec is not None:
                rec.status = CREATING
                rec.message = "starting %d instance(s)" % desired_instances(rec.config)
            else:
                rec.status, rec.message = RUNNING, "started"
            return await self._put(rec)

    # ---- delete ---------------------------------------------------------------
    async def delete(self, name: str) -> dict:
        """Returns {"deleted": name, "kept_entry": bool, "traffic_to": [...]}."""
        async with self._lock:
            rec = await self.get(name)
            records = {r.name: r for r in await self.store.list_services()}
            linked = sorted(n for n, r in records.items() if r.linked_to == name)
            result = {"deleted": name, "kept_entry": False, "traffic_to": []}
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
                    revision=rec.revision, history=rec.history, traffic=traffic, rules=rec.rules,
                    created_at=rec.created_at)
                await self._put(entry)
                result.update(kept_entry=True, traffic_to=[k for k, v in traffic.items() if v])
                return result
            await self.store.delete_service(name)
            if is_entry_only(rec.config):
                for other in linked:  # the endpoint is gone: linked services get their own back
                    child = records[other]
                    child.linked_to, child.released = None, False
                    await self._put(child)
            # Whoever sent traffic here sends it to the rest now; rules aiming here go.
            for other in records.values():
                if other.name == name:
                    continue
                kept_rules = [r for r in other.rules if r.get("target") != name]
                if name not in other.traffic:
                    if len(kept_rules) != len(other.rules):
                        other.rules = kept_rules
                        await self._put(other)
                    continue
                other.rules = kept_rules
                rest = {k: v for k, v in other.traffic.items() if k != name}
                if not rest or (is_entry_only(other.config) and not any(
                        k != other.name for k in rest)):
                    rest = {}
                elif sum(rest.values()) == 0:
                    rest = {other.name: 100} if not is_entry_only(other.config) else \
                        _rescale({k: 1 for k in rest}, 100)
                else:
                    rest = _rescale(rest, 100)
                if is_entry_only(other.config) and not any(v for v in rest.values()):
                    # An entry with nothing left to forward to goes too.
                    await self.store.delete_service(other.name)
                    continue
                other.traffic = _normalized_traffic(other.name, rest)
                await self._put(other)
                result["traffic_to"] = [k for k, v in effective_traffic(other).items() if v]
            return result

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
        async with self._lock:
            rec = await self.get(name)
            if not rec.linked_to:
                raise ServiceError(400, f"service {name!r} is not a linked service: release works "
                                        "on a service made with create -r")
            original = await self.store.get_service(rec.linked_to)
            if original is None:
                raise ServiceError(404, f"the original service {rec.linked_to!r} of {name!r} no "
                                        "longer exists")
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
            original.traffic = traffic
            await self._put(original)
            if not rec.released:
                rec.released = True
                rec.message = f"released into {original.name} at {weight}%"
                await self._put(rec)
            return original

    # ---- ModelArts: traffic shares and header rules ---------------------------
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
        async with self._lock:
            rec = await self.get(name)
            if rec.linked_to and rec.released:
                raise ServiceError(400, f"service {name!r} is released into {rec.linked_to!r}: "
                                        f"set the traffic of {rec.linked_to!r}")
            for target in clean:
                if target == name:
                    if is_entry_only(rec.config) and clean[target]:
                        raise ServiceError(400, f"service {name!r} was deleted: it has no "
                                                "instances to take a share")
                    continue
                other = await self.store.get_service(target)
                if other is None:
                    raise ServiceError(400, f"traffic target {target!r} is not a service")
                if other.linked_to and other.linked_to != name and other.released:
                    raise ServiceError(400, f"traffic target {target!r} is released into "
                                            f"{other.linked_to!r}")
            rec.traffic = _normalized_traffic(name, clean)
            return await self._put(rec)

    async def set_rules(self, name: str, rules) -> ServiceRecord:
        if isinstance(rules, dict) and "rules" in rules:
            rules = rules["rules"]
        try:
            ruleset = RuleSet(rules if rules is not None else [])
        except ValueError as exc:  # RuleSyntaxError included: names the rule and position
            raise ServiceError(400, str(exc)) from None
        async with self._lock:
            rec = await self.get(name)
            for i, target in enumerate(ruleset.targets):
                if target != name and await self.store.get_service(target) is None:
                    raise ServiceError(400, f"rule {i}: target {target!r} is not a service")
            rec.rules = ruleset.rules
            return await self._put(rec)

    # ---- used by the launcher -------------------------------------------------
    async def set_status(self, name: str, status: str, message: str,
                         revision: int | None = None) -> ServiceRecord | None:
        """Set status/message unless the user stopped the service or changed its version
        meanwhile (``revision``: the version the caller acted on)."""
        async with self._lock:
            rec = await self.store.get_service(name)
            if rec is None:
                return None
            if rec.status == STOPPED and status != STOPPED:
                return rec
            if revision is not None and rec.revision != revision:
                return rec
            if rec.status == status and rec.message == message:
                return rec
            rec.status, rec.message = status, message
            return await self._put(rec)

    async def claim(self, name: str) -> ServiceRecord | None:
        """Become the owner of a service that has none (records written by older tools)."""
        async with self._lock:
            rec = await self.store.get_service(name)
            if rec is None or owner_of(rec.config):
                return rec
            rec.config.setdefault("metadata", {})["owner"] = self.owner
            return await self._put(rec)


__all__ = ["ServiceOps", "ServiceError", "ModelSpec", "model_spec", "check_config", "deep_merge",
           "set_dotted", "owner_of", "is_entry_only", "desired_instances", "effective_traffic",
           "StoreUnavailable"]
