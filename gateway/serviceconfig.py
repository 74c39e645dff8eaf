"""The EAS service.json: parsing, defaults and validation of `metadata`.

Beyond EAS's keys: `endpoints` (servers that run elsewhere: [{ip, port 1-65535,
weight >= 0}]), `upstream_path` (the path requests are forwarded to, starting
with "/"), `health_path` (what the gateway's health checker requests on each
instance, starting with "/"; "" means a TCP connect check only).

Keys may be flat (`"rpc.keepalive": 5000`) as in the EAS manual, or nested
(`"rpc": {"keepalive": 5000}`). Invalid values are refused with a message naming
the key. Unknown keys are refused too, naming the closest known one: a typo such
as `generate_tokn` would otherwise create a service without authentication.
Keys that EAS or ModelArts define but infergate does not implement are accepted
and reported as ignored, so that their service.json files deploy as they are.
"""
from __future__ import annotations

import dataclasses
import difflib
from typing import Any

PROCESSORS = ("tensorflow", "pytorch", "caffe", "json", "python")
# metadata.onnxruntime keys -> the execution provider each configures.
PROVIDER_KEYS = {"tensorrt": "TensorrtExecutionProvider", "cuda": "CUDAExecutionProvider",
                 "cpu": "CPUExecutionProvider"}
# The local launcher runs every instance on the gateway's machine.
MAX_INSTANCES = 64


class ConfigError(ValueError):
    """A service.json field is invalid; the message names the field."""


@dataclasses.dataclass(frozen=True)
class RpcSettings:
    batching: bool = False
    max_batch_size: int = 16
    max_batch_timeout: int = 50  # ms
    max_queue_size: int = 64
    keepalive: int = 5000  # ms
    # ms the gateway gives one try while another instance is left to retry on; 0: keepalive
    try_timeout: int = 0
    io_threads: int = 4
    worker_threads: int = 5
    # Sizes batches are padded to; None: powers of two on an accelerator, none on the CPU.
    batch_sizes: tuple | None = None


# key -> (type, minimum)
_RPC_KEYS = {
    "batching": (bool, None),
    "max_batch_size": (int, 1),
    "max_batch_timeout": (int, 0),
    "max_queue_size": (int, 1),
    "keepalive": (int, 1),
    "try_timeout": (int, 0),
    "io_threads": (int, 1),
    "worker_threads": (int, 1),
    "batch_sizes": (tuple, 1),
}


# --- the keys of a service.json ------------------------------------------------------------
# Keys infergate reads, with where. Top level: control/services.py (create, modify, model_spec),
# control/launcher.py (model_config, env), routing/table.py (endpoints, upstream_path,
# health_path); entry_only marks the endpoint a deleted blue-green original leaves behind.
TOP_LEVEL_KEYS = ("name", "token", "generate_token", "model_path", "model_entry", "model_config",
                  "processor", "processor_type", "processor_entry", "processor_path", "metadata",
                  "endpoints", "upstream_path", "health_path", "env", "entry_only")
# metadata: validate_service below, control/services.py (instance, owner, which the gateway
# sets), control/launcher.py (gpu, workers), routing/table.py (rate_limits), cli/worker_cmd.py
# (processes, onnxruntime, signature_name); cpu and memory are checked but not used locally.
METADATA_KEYS = ("instance", "cpu", "gpu", "memory", "workers", "processes", "owner",
                 "rate_limits", "onnxruntime", "signature_name")
# endpoints[i]: routing/table.py and control/admin.py.
ENDPOINT_KEYS = ("ip", "port", "weight", "grpc_port")

# Keys defined elsewhere that are accepted and ignored (listed in the create/modify answer and
# in desc). A key listed here covers what it holds ("cloud" covers "cloud.networking.vpc_id").
IGNORED_TOP_LEVEL_KEYS = (
    # EAS manual (../shared/seeds/002, eascmd "创建服务" parameter table and examples)
    "oss_endpoint", "processor_mainclass", "data_image", "cuda",
    # EAS JSON parameter reference (alibabacloud.com/help/en/pai/user-guide/
    # parameters-of-model-services), the newer form of the same file
    "cloud", "containers", "dockerAuth", "networking", "storage", "autoscaler", "runtime",
    "features", "labels",
    # ModelArts real-time service "Description" (../shared/seeds/000, Table 3-1)
    "description",
    # SPEC.md section 11, not built yet
    "upstream_tls",
)
IGNORED_METADATA_KEYS = (
    # EAS manual (seeds/002): resource group, region and CUDA version of the instances, and
    # the flat "eas.handlers.disable_failure_handler" of its MediaFlow examples
    "resource", "region", "cuda", "eas",
    # EAS JSON parameter reference (see above); the last three as issue 22 names them
    "workspace_id", "disk", "shm_size", "rdma", "enable_grpc", "rolling_strategy",
    "resource_burstable", "qos", "enable_webservice",
    # SPEC.md section 9 (Ray placement), not built yet
    "autoscaling",
)
# metadata.rpc.*: EAS manual (seeds/002, the MediaFlow examples)
IGNORED_RPC_KEYS = ("enable_jemalloc",)


def _unknown_key(path: str, key: str, candidates: dict, known) -> ConfigError:
    """The refusal of an unknown key: its full path and the path of the closest candidate
    ({name: path}), or, when none is close, the keys infergate reads there."""
    close = difflib.get_close_matches(key, list(candidates), n=1, cutoff=0.6)
    if close:
        return ConfigError(f"unknown key '{path}': did you mean '{candidates[close[0]]}'?")
    return ConfigError(f"unknown key '{path}' (infergate reads {', '.join(known)} here)")


def unknown_key_error(prefix: str, key: str, known) -> ConfigError:
    """`prefix + key` is none of `known` (names under `prefix`): ConfigError naming both."""
    return _unknown_key(prefix + key, key, {name: prefix + name for name in known}, known)


class _KeyWalk:
    """One pass over the keys of a service.json: the ignored ones are collected, an unknown
    one is refused, or (`keep_unknown`, for services stored before keys were checked)
    collected with them."""

    def __init__(self, keep_unknown: bool):
        self.keep_unknown = keep_unknown
        self.ignored: list[str] = []

    def unknown(self, path: str, key: str, candidates: dict, known) -> None:
        if not self.keep_unknown:
            raise _unknown_key(path, key, candidates, known)
        self.ignored.append(path)

    def check(self, prefix: str, obj: dict, known, ignored=(), also_suggest=(),
              shown=None) -> None:
        """Keys of `obj` that are neither known nor ignored are unknown; a key given as
        null counts as not set (how modify unsets a key). `shown`: how to list `known`."""
        for key, value in obj.items():
            if value is None or key in known:
                continue
            if key.split(".")[0] in ignored:  # "eas" covers "eas.handlers.x"
                self.ignored.append(prefix + key)
                continue
            names = [*known, *ignored, *also_suggest]
            self.unknown(prefix + key, key, {name: prefix + name for name in names},
                         shown or known)


def _walk_keys(config: dict, keep_unknown: bool) -> list[str]:
    walk = _KeyWalk(keep_unknown)
    for key, value in config.items():
        if value is None or key in TOP_LEVEL_KEYS:
            continue
        if key in IGNORED_TOP_LEVEL_KEYS:
            walk.ignored.append(key)
            continue
        # `-Dinstance=3` for `-Dmetadata.instance=3` is a likely slip: offer metadata's keys too
        candidates = {name: f"metadata.{name}" for name in METADATA_KEYS}
        candidates.update((name, name) for name in TOP_LEVEL_KEYS + IGNORED_TOP_LEVEL_KEYS)
        walk.unknown(key, key, candidates, TOP_LEVEL_KEYS)
    metadata = config.get("metadata")
    if isinstance(metadata, dict):
        metadata = flat_rpc(metadata)
        rpc = {k[len("rpc."):]: v for k, v in metadata.items() if k.startswith("rpc.")}
        rest = {k: v for k, v in metadata.items() if not k.startswith("rpc.")}
        rpc_names = [f"rpc.{name}" for name in (*_RPC_KEYS, *IGNORED_RPC_KEYS)]
        walk.check("metadata.", rest, METADATA_KEYS, IGNORED_METADATA_KEYS, rpc_names,
                   shown=(*METADATA_KEYS, "rpc.*"))
        walk.check("metadata.rpc.", rpc, _RPC_KEYS, IGNORED_RPC_KEYS)
        limits = metadata.get("rate_limits")
        if isinstance(limits, list):
            from .ratelimit.filter import FIELDS as RATE_LIMIT_KEYS

            for i, limit in enumerate(limits):
                if isinstance(limit, dict):
                    walk.check(f"metadata.rate_limits[{i}].", limit, RATE_LIMIT_KEYS)
    endpoints = config.get("endpoints")
    if isinstance(endpoints, list):
        for i, endpoint in enumerate(endpoints):
            if isinstance(endpoint, dict):
                walk.check(f"endpoints[{i}].", endpoint, ENDPOINT_KEYS)
    return walk.ignored


def check_keys(config: dict) -> list[str]:
    """Refuse an unknown key of a service.json, at every level infergate reads, naming its
    path and the closest known key; returns the paths of the keys accepted and ignored."""
    return _walk_keys(config, keep_unknown=False)


def ignored_keys(config: dict) -> list[str]:
    """The keys of a stored service.json that infergate ignores (for desc), its unknown ones
    included: a service stored before keys were checked may hold some."""
    try:
        return _walk_keys(config, keep_unknown=True)
    except ConfigError:  # metadata.rpc given both ways, differently: create refuses that
        return []


def flat_rpc(metadata: dict) -> dict:
    """metadata with a nested "rpc" object written as flat "rpc.<key>" keys (EAS style):
    what is validated is what is stored, and merges and -D settings meet the same key. A
    key given both ways with different values is refused, naming both."""
    flat = dict(metadata)
    nested = flat.pop("rpc", None)
    if nested is None:
        return flat
    if not isinstance(nested, dict):
        raise ConfigError("metadata.rpc must be an object")
    for key, value in nested.items():
        dotted = f"rpc.{key}"
        if dotted in flat and flat[dotted] != value:
            raise ConfigError(f"metadata key \"{dotted}\" is {flat[dotted]!r} but the nested "
                              f"metadata.rpc object gives {key} {value!r}: give the setting "
                              f"once")
        flat[dotted] = value
    return flat


def _coerce(key: str, value: Any, kind: type, minimum: int | None, prefix: str = "metadata."):
    if kind is tuple:  # a list of integers, or "1,2,4" as a flag or -D value gives it
        if isinstance(value, str):
            value = [part for part in value.replace(" ", "").split(",") if part]
        if not isinstance(value, list):
            raise ConfigError(f"{prefix}{key} must be a list of integers, got {value!r}")
        return tuple(_coerce(f"{key}[{i}]", v, int, minimum, prefix) for i, v in enumerate(value))
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ConfigError(f"{prefix}{key} must be true or false, got {value!r}")
    if isinstance(value, bool):
        raise ConfigError(f"{prefix}{key} must be an integer, got {value!r}")
    try:
        number = int(value)
        if isinstance(value, float) and value != number:
            raise ValueError
    except (TypeError, ValueError):
        raise ConfigError(f"{prefix}{key} must be an integer, got {value!r}") from None
    if minimum is not None and number < minimum:
        raise ConfigError(f"{prefix}{key} must be at least {minimum}, got {number}")
    return number


def rpc_settings(metadata: dict | None, **overrides) -> RpcSettings:
    """RpcSettings from a service's metadata; `overrides` (command-line flags) win."""
    flat = flat_rpc(metadata or {})
    values = {}
    for key, (kind, minimum) in _RPC_KEYS.items():
        if f"rpc.{key}" in flat:
            values[key] = _coerce(f"rpc.{key}", flat[f"rpc.{key}"], kind, minimum)
    for key, value in overrides.items():
        if value is not None:
            values[key] = _coerce(f"rpc.{key}", value, *_RPC_KEYS[key])
    return RpcSettings(**values)


def gpus_per_instance(metadata: dict | None) -> int | None:
    """metadata.gpu: devices per instance (0: the CPU only), None when not set."""
    value = (metadata or {}).get("gpu")
    return None if value is None else _coerce("gpu", value, int, 0)


def worker_processes(metadata: dict | None, override: int | None = None) -> int:
    """Processes serving one worker's port: `override` (a flag), else metadata.processes."""
    value = override if override is not None else (metadata or {}).get("processes", 1)
    return _coerce("processes", value, int, 1)


def provider_options(metadata: dict | None) -> dict:
    """metadata.onnxruntime: {"cuda": {option: value}, "tensorrt": {...} or true, "cpu": {...}}."""
    options = (metadata or {}).get("onnxruntime") or {}
    if not isinstance(options, dict):
        raise ConfigError("metadata.onnxruntime must be an object such as "
                          '{"cuda": {"cudnn_conv_algo_search": "HEURISTIC"}}')
    for provider, values in options.items():
        if provider not in PROVIDER_KEYS:
            raise ConfigError(f"metadata.onnxruntime.{provider} is not a provider; use "
                              f"{', '.join(PROVIDER_KEYS)}")
        if isinstance(values, bool) and provider == "tensorrt":
            continue
        if not isinstance(values, dict) or not all(
                isinstance(v, (str, int, float, bool)) for v in values.values()):
            raise ConfigError(f"metadata.onnxruntime.{provider} must be an object of option "
                              "names to strings, numbers or booleans")
    return options


def processor_kind(processor: str) -> str:
    """Map EAS processor names (`tensorflow_cpu_1.15`, `pytorch_gpu_1.10`) to ours."""
    name = (processor or "").lower()
    for kind in PROCESSORS:
        if name == kind or name.startswith(kind + "_"):
            return kind
    if name in ("onnx", "onnxruntime"):
        return "tensorflow"
    raise ConfigError(f"processor must be one of {', '.join(PROCESSORS)} "
                      f"(or an EAS name such as tensorflow_cpu_1.15), got {processor!r}")


def _check_path(key: str, value: Any, allow_empty: bool) -> None:
    """A path that goes into a request line as it is: a string starting with "/",
    latin-1, no spaces or control characters (they would split the request)."""
    if allow_empty and value == "":
        return
    what = ('a path starting with "/" (or "" for a TCP connect check only)' if allow_empty
            else 'a path starting with "/"')
    if not isinstance(value, str) or not value.startswith("/"):
        raise ConfigError(f"{key} must be {what}, got {value!r}")
    try:
        value.encode("latin-1")
    except UnicodeEncodeError:
        raise ConfigError(f"{key} must be latin-1 text (percent-encode other characters), "
                          f"got {value!r}") from None
    if any(ord(c) <= 0x20 or ord(c) == 0x7F for c in value):
        raise ConfigError(f"{key} must not contain spaces or control characters, got {value!r}")


def validate_service(config: dict) -> dict:
    """Check a whole service.json; returns it with metadata defaults untouched."""
    if not isinstance(config, dict):
        raise ConfigError("service.json must be a JSON object")
    check_keys(config)
    name = config.get("name")
    if not isinstance(name, str) or not name:
        raise ConfigError("name is required and must be a non-empty string")
    if not all(c.isalnum() or c in "_-" for c in name) or len(name) > 128:
        raise ConfigError(f"name {name!r} may hold only letters, digits, '_' and '-' "
                          "(at most 128 characters)")
    if "generate_token" in config and str(config["generate_token"]).lower() not in ("true", "false"):
        raise ConfigError(f"generate_token must be \"true\" or \"false\", got {config['generate_token']!r}")
    if "token" in config and not isinstance(config["token"], str):
        raise ConfigError("token must be a string")
    metadata = config.get("metadata", {})
    if not isinstance(metadata, dict):
        raise ConfigError("metadata must be an object")
    rpc_settings(metadata)
    if "rate_limits" in metadata:
        from .ratelimit import validate_rate_limits

        try:
            validate_rate_limits(metadata["rate_limits"])
        except ValueError as exc:
            raise ConfigError(f"metadata.{exc}") from None
    for key in ("instance", "cpu", "gpu", "memory", "workers"):
        if key in metadata:
            _coerce(key, metadata[key], int, 0)
    worker_processes(metadata)
    if "onnxruntime" in metadata:
        provider_options(metadata)
    if "instance" in metadata and _coerce("instance", metadata["instance"], int, 0) > MAX_INSTANCES:
        raise ConfigError(f"metadata.instance must be at most {MAX_INSTANCES} (worker processes "
                          f"on this machine), got {metadata['instance']}")
    endpoints = config.get("endpoints")
    if endpoints is not None:
        if not isinstance(endpoints, list) or not endpoints:
            raise ConfigError("endpoints must be a non-empty list of {ip, port, weight}")
        for i, ep in enumerate(endpoints):
            if not isinstance(ep, dict):
                raise ConfigError(f"endpoints[{i}] must be an object {{ip, port, weight}}")
            ip = ep.get("ip")
            if not isinstance(ip, str) or not ip.strip():
                raise ConfigError(f"endpoints[{i}].ip is required and must be a non-empty string")
            if any(c.isspace() or c in "/?#@" for c in ip):
                raise ConfigError(f"endpoints[{i}].ip must be an address or host name, "
                                  f"got {ip!r}")
            port = _coerce(f"endpoints[{i}].port", ep.get("port"), int, None, prefix="")
            if not 1 <= port <= 65535:
                raise ConfigError(f"endpoints[{i}].port must be from 1 to 65535, got {port}")
            if "weight" in ep:
                _coerce(f"endpoints[{i}].weight", ep["weight"], int, 0, prefix="")
    env = config.get("env")
    if env is not None and (not isinstance(env, dict) or not all(
            isinstance(k, str) and k and "=" not in k and isinstance(v, str)
            for k, v in env.items())):
        raise ConfigError("env must be an object of variable names to string values")
    signature = (config.get("metadata") or {}).get("signature_name")
    if signature is not None and (not isinstance(signature, str) or not signature.strip()):
        raise ConfigError(f"metadata.signature_name must be a non-empty string, got "
                          f"{signature!r}")
    # null means "not set" (how modify -s unsets a key)
    if config.get("upstream_path") is not None:
        _check_path("upstream_path", config["upstream_path"], allow_empty=False)
    if config.get("health_path") is not None:
        _check_path("health_path", config["health_path"], allow_empty=True)
    if endpoints is None and "model_path" in config:
        if not isinstance(config["model_path"], str) or not config["model_path"]:
            raise ConfigError("model_path must be a non-empty string")
        processor_kind(config.get("processor", "tensorflow"))
    return config
