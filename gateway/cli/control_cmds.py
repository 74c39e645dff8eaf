"""Control-plane commands (mirroring eascmd): they talk to a gateway's admin API.

    infergate create service.json [-r]         infergate release SVC -w N
    infergate modify SVC -Dmetadata.instance=3 infergate modify SVC -s partial.json
    infergate desc SVC    infergate list       infergate stop|start|delete SVC
    infergate version SVC N                    infergate traffic SVC a=70 b=30
    infergate rules SVC rules.json             infergate instances SVC

Common options: --gateway URL (env INFERGATE_GATEWAY, default
http://127.0.0.1:8080), --admin-token T (env INFERGATE_ADMIN_TOKEN), --json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request
from urllib.parse import quote, urlencode

from ..control.callers import FIELDS as CALLER_FIELDS
from .errors import CliError

DEFAULT_GATEWAY = "http://127.0.0.1:8080"
WAIT_STATES = ("Creating", "Updating", "Restarting")
STARTING_GATEWAY_S = 5.0  # how long a refused connection is tried again


# ------------------------------------------------------------------------- HTTP
class AdminClient:
    """The admin API over urllib -- never through a proxy: ``http_proxy`` and
    friends are ignored, so the admin token goes to the gateway and nowhere else
    (a proxy would see it, and a gateway on 127.0.0.1 is not reachable through
    one anyway)."""

    def __init__(self, gateway: str, token: str = "", timeout: float = 30.0):
        from ..control import normalize_url

        gateway = (gateway or DEFAULT_GATEWAY).strip().rstrip("/")
        if "://" not in gateway:
            gateway = "http://" + gateway
        try:
            gateway = normalize_url(gateway).rstrip("/")   # brackets an IPv6 host
        except ValueError as exc:
            raise CliError(f"--gateway {gateway!r}: {exc}") from None
        self.base = gateway
        self.token = token or ""
        self.timeout = timeout
        self.opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def call(self, method: str, path: str, body=None):
        data = None
        headers = {"Accept": "application/json"}
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        req = urllib.request.Request(self.base + path, data=data, headers=headers, method=method)
        try:
            payload = self._send(req)
        except urllib.error.HTTPError as exc:
            payload = exc.read()
            try:
                message = json.loads(payload)["message"]
            except Exception:
                message = payload.decode("utf-8", "replace").strip()[:300] or exc.reason
            if exc.code == 404 and path.startswith("/admin/") and "no route" in str(message):
                message = f"{self.base} has no admin API (is it an infergate gateway?)"
            raise CliError(f"{message} (HTTP {exc.code})") from None
        except urllib.error.URLError as exc:
            raise CliError(f"cannot reach the gateway at {self.base}: {exc.reason} "
                           "(set --gateway or INFERGATE_GATEWAY)") from None
        except (OSError, TimeoutError) as exc:
            raise CliError(f"cannot reach the gateway at {self.base}: {exc}") from None
        try:
            return json.loads(payload) if payload else None
        except ValueError:
            raise CliError(f"the gateway at {self.base} answered something that is not JSON") \
                from None

    def _send(self, req) -> bytes:
        """The answer's body; a refused connection is tried again for STARTING_GATEWAY_S
        (a gateway started a moment ago, as in `infergate gateway & infergate create`):
        refused, the request never reached it, so sending it again is safe."""
        deadline = time.monotonic() + STARTING_GATEWAY_S
        while True:
            try:
                with self.opener.open(req, timeout=self.timeout) as resp:
                    return resp.read()
            except urllib.error.URLError as exc:
                if not isinstance(exc.reason, ConnectionRefusedError) or \
                        time.monotonic() > deadline:
                    raise
            time.sleep(0.2)


def _svc(name: str) -> str:
    return "/admin/services/" + quote(name, safe="")


def _client(args) -> AdminClient:
    return AdminClient(args.gateway, args.admin_token)


# ------------------------------------------------------------------------- input helpers
def parse_value(text: str):
    """-D values: JSON when the text parses as JSON (3, true, {"a": 1}), else the string."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def parse_defines(items) -> dict:
    """["metadata.instance=3", ...] -> {"metadata.instance": 3, ...}."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise CliError(f"-D{item}: expected -Dkey=value, e.g. -Dmetadata.instance=3")
        out[key] = parse_value(value)
    return out


def load_json_file(path: str, what: str):
    try:
        if path == "-":
            text = sys.stdin.read()
        else:
            with open(path, encoding="utf-8") as f:
                text = f.read()
    except OSError as exc:
        raise CliError(f"cannot read {what} {path!r}: {exc.strerror or exc}") from None
    try:
        return json.loads(text)
    except ValueError as exc:
        raise CliError(f"{path} is not valid JSON: {exc}") from None


def _resolve_local_paths(config: dict, json_path: str) -> dict:
    """Relative model/processor paths are relative to the service.json's directory."""
    if json_path == "-" or not isinstance(config, dict):
        return config
    base = os.path.dirname(os.path.abspath(json_path))
    for key in ("model_path", "processor_path"):
        value = config.get(key)
        if isinstance(value, str) and value and "://" not in value and not os.path.isabs(
                os.path.expanduser(value)):
            candidate = os.path.normpath(os.path.join(base, value))
            if os.path.exists(candidate):
                config[key] = candidate
    return config


# ------------------------------------------------------------------------- output
def _table(rows: list[list], headers: list[str] | None = None) -> str:
    rows = [["" if c is None else str(c) for c in row] for row in rows]
    if headers:
        rows = [headers] + rows
    if not rows:
        return ""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    line = "+" + "+".join("-" * (w + 2) for w in widths) + "+"
    out = [line]
    for i, row in enumerate(rows):
        out.append("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |")
        if headers and i == 0:
            out.append(line)
    out.append(line)
    return "\n".join(out)


def _traffic_text(traffic: dict) -> str:
    return ", ".join(f"{k}={v}%" for k, v in traffic.items())


def _traffic_cell(view: dict) -> str:
    if view.get("linked_to") and view.get("released"):
        return f"{view.get('share') or 0}% of {view['linked_to']}"
    return _traffic_text(view.get("traffic") or {})


def _when(ts) -> str:
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(ts)))
    except (TypeError, ValueError):
        return ""


def _print(args, data, human) -> None:
    if args.json:
        print(json.dumps(data, indent=2, sort_keys=False))
    else:
        text = human(data)
        if text:
            print(text)


def _summary(view: dict) -> str:
    rows = [["Service", view["name"]], ["Endpoint", view["endpoint"]]]
    if view.get("token"):
        rows.append(["Token", view["token"]])
    return _table(rows)


def describe(view: dict) -> str:
    rows = [
        ["Status", view["status"]],
        ["ServiceName", view["name"]],
        ["Message", view.get("message", "")],
        ["Endpoint", view["endpoint"]],
        ["Token", view.get("token") or "(none: no authentication)"],
        ["Owner", view.get("owner", "")],
        ["CreateTime", _when(view.get("created_at"))],
        ["UpdateTime", _when(view.get("updated_at"))],
        ["TotalInstance", view.get("total_instances")],
        ["RunningInstance", view.get("running_instances")],
        ["LatestVersion", view.get("latest_revision")],
        ["CurrentVersion", view.get("revision")],
        ["Traffic", _traffic_cell(view)],
    ]
    if view.get("linked_to"):
        rows.append(["LinkedTo", view["linked_to"] + (" (released)" if view.get("released")
                                                      else "")])
    if view.get("linked_services"):
        rows.append(["LinkedServices", ", ".join(view["linked_services"])])
    if view.get("restarts"):
        rows.append(["Restarts", view["restarts"]])
    if view.get("crash_logs"):
        rows.append(["LastCrashLog", view["crash_logs"][-1]])
    if view.get("ignored"):
        rows.append(["Ignored", ", ".join(view["ignored"])])
    for warning in view.get("warnings") or ():
        rows.append(["Warning", warning])
    out = [_table(rows)]
    instances = view.get("instances") or []
    if instances:
        out.append("Instances:")
        out.append(_table([[i["id"], i["weight"], "healthy" if i["healthy"] else "unhealthy",
                            i.get("heartbeat_age_s", "static")] for i in instances],
                          ["Instance", "Weight", "Health", "Heartbeat age (s)"]))
    rules = view.get("rules") or []
    if rules:
        out.append("Rules:")
        out.append(_table([[i, r["condition"], r["target"],
                            f"{r['header_name']}: {r['header_value']}" if r.get("header_name")
                            else ""] for i, r in enumerate(rules)],
                          ["#", "Condition", "Target", "Adds header"]))
    if "config" in view:
        out.append("ServiceConfig:")
        out.append(json.dumps(view["config"], indent=2))
    return "\n".join(out)


def _list_text(views: list) -> str:
    if not views:
        return "no services"
    return _table([[v["name"], v["status"], f"{v['running_instances']}/{v['total_instances']}",
                    v["revision"], _traffic_cell(v),
                    (v["linked_to"] or "") + (" (released)" if v.get("released") else ""),
                    v["endpoint"]] for v in views],
                  ["Name", "Status", "Instances", "Version", "Traffic", "LinkedTo", "Endpoint"])


# ------------------------------------------------------------------------- waiting
def wait_running(client: AdminClient, name: str, timeout: float, quiet: bool) -> dict:
    """Poll desc until the service leaves Creating/Updating; CliError when it Failed."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        view = client.call("GET", _svc(name))
        status = view["status"]
        progress = (status, view.get("running_instances"), view.get("total_instances"))
        if not quiet and progress != last and status in WAIT_STATES:
            print(f"[OK] Waiting [Total: {view['total_instances']}, "
                  f"Running: {view['running_instances']}] ({status}: {view.get('message', '')})",
                  file=sys.stderr)
        last = progress
        if status == "Failed":
            raise CliError(f"service {name} failed: {view.get('message', '')}")
        if status not in WAIT_STATES:
            return view
        if time.monotonic() > deadline:
            raise CliError(f"service {name} is still {status} after {timeout:g}s "
                           f"({view.get('message', '')}); see infergate desc {name}")
        time.sleep(0.25)


def _after_change(args, client, view: dict, done: str) -> dict:
    if getattr(args, "wait", False) and view["status"] in WAIT_STATES:
        view = wait_running(client, view["name"], args.timeout, args.json)
    if not args.json:
        if view.get("ignored"):
            print("[WARN] Ignored (accepted, not implemented by infergate): "
                  + ", ".join(view["ignored"]), file=sys.stderr)
        for warning in view.get("warnings") or ():
            print(f"[WARN] {warning}", file=sys.stderr)
        print(_summary(view))
        print(f"[OK] {done}" if view["status"] != "Stopped" else "[OK] Service is stopped")
    else:
        print(json.dumps(view, indent=2))
    return view


# ------------------------------------------------------------------------- commands
def cmd_create(args) -> int:
    config = _resolve_local_paths(load_json_file(args.service_json, "service.json"),
                                  args.service_json)
    if not isinstance(config, dict):
        raise CliError(f"{args.service_json} must hold a JSON object")
    client = _client(args)
    path = "/admin/services" + ("?linked=true" if args.linked else "")
    view = client.call("POST", path, config)
    if not args.json:
        print(f"[OK] Created service {view['name']}" +
              (f" linked to {view['linked_to']}" if view.get("linked_to") else ""),
              file=sys.stderr)
    _after_change(args, client, view, "Service is running")
    return 0


def cmd_modify(args) -> int:
    if not args.define and not args.service_json:
        raise CliError("nothing to modify: give -Dkey=value (repeatable) or -s partial.json")
    body = {"set": parse_defines(args.define)}
    if args.service_json:
        body["patch"] = _resolve_local_paths(load_json_file(args.service_json, "partial "
                                                            "service.json"), args.service_json)
    client = _client(args)
    view = client.call("POST", _svc(args.service) + "/modify", body)
    _after_change(args, client, view, f"Service is running at version {view['revision']}")
    return 0


def cmd_release(args) -> int:
    client = _client(args)
    view = client.call("POST", _svc(args.service) + "/release", {"weight": args.weight})
    if args.json:
        print(json.dumps(view, indent=2))
    else:
        print(f"[OK] Service [{args.service}] is weighted to {args.weight}% now "
              f"(traffic of {view.get('linked_to')}: ", end="")
        original = client.call("GET", _svc(view["linked_to"]) + "/traffic")
        print(_traffic_text(original) + ")")
    return 0


def cmd_desc(args) -> int:
    view = _client(args).call("GET", _svc(args.service))
    _print(args, view, describe)
    return 0


def cmd_list(args) -> int:
    views = _client(args).call("GET", "/admin/services")
    _print(args, views, _list_text)
    return 0


def _simple(action: str, done: str):
    def run(args) -> int:
        client = _client(args)
        view = client.call("POST", _svc(args.service) + "/" + action)
        _after_change(args, client, view, done)
        return 0
    return run


def cmd_delete(args) -> int:
    result = _client(args).call("DELETE", _svc(args.service))
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        line = f"[OK] Service [{args.service}] was deleted"
        if result.get("kept_entry"):
            line += (f"; its endpoint stays and sends all traffic to "
                     f"{', '.join(result['traffic_to'])}")
        elif result.get("traffic_to"):
            line += f"; traffic goes to {', '.join(result['traffic_to'])}"
        print(line)
    return 0


def cmd_version(args) -> int:
    client = _client(args)
    view = client.call("POST", _svc(args.service) + "/version", {"version": args.version})
    _after_change(args, client, view, f"Service is running at version {view['revision']}")
    return 0


def cmd_traffic(args) -> int:
    client = _client(args)
    if args.shares:
        shares = {}
        for item in args.shares:
            target, sep, share = item.partition("=")
            if not sep or not target:
                raise CliError(f"{item!r}: expected SERVICE=SHARE, e.g. {args.service}=80")
            try:
                shares[target] = int(share)
            except ValueError:
                raise CliError(f"{item!r}: the share must be an integer from 0 to 100") from None
        traffic = client.call("PUT", _svc(args.service) + "/traffic", shares)
    else:
        traffic = client.call("GET", _svc(args.service) + "/traffic")
    _print(args, traffic, lambda t: _table([[k, f"{v}%"] for k, v in t.items()],
                                           ["Version", "Share"]))
    return 0


def cmd_rules(args) -> int:
    client = _client(args)
    if args.clear:
        rules = client.call("PUT", _svc(args.service) + "/rules", [])
    elif args.rules_json:
        rules = client.call("PUT", _svc(args.service) + "/rules",
                            load_json_file(args.rules_json, "rules file"))
    else:
        rules = client.call("GET", _svc(args.service) + "/rules")

    def text(rs):
        if not rs:
            return "no rules: the traffic shares decide"
        return _table([[i, r["condition"], r["target"],
                        f"{r['header_name']}: {r['header_value']}" if r.get("header_name") else ""]
                       for i, r in enumerate(rs)], ["#", "Condition", "Target", "Adds header"])
    _print(args, rules, text)
    return 0


def cmd_instances(args) -> int:
    insts = _client(args).call("GET", _svc(args.service) + "/instances")
    _print(args, insts, lambda xs: _table(
        [[i["id"], i["weight"], "healthy" if i["healthy"] else "unhealthy",
          i.get("heartbeat_age_s", "static")] for i in xs],
        ["Instance", "Weight", "Health", "Heartbeat age (s)"]) if xs else "no instances")
    return 0


def cmd_callers(args) -> int:
    client = _client(args)
    path = _svc(args.service) + "/callers"
    if args.action == "add":
        caller = {key: getattr(args, key) for key in CALLER_FIELDS if getattr(args, key)}
        if args.token:
            caller["token"] = args.token
        added = client.call("POST", path, caller)
        _print(args, added, lambda c: f"[OK] caller added; its token: {c['token']}")
        return 0
    if args.action == "remove":
        if not args.who:
            raise CliError("callers SERVICE remove needs the caller's token or user name")
        client.call("DELETE", path + "?" + urlencode({"caller": args.who}))
        print(f"[OK] caller {args.who} removed")
        return 0
    callers = client.call("GET", path)
    _print(args, callers, lambda cs: _table(
        [[c.get(key, "") for key in CALLER_FIELDS] + [c["token"]] for c in cs],
        [key.replace("_", " ").title() for key in CALLER_FIELDS] + ["Token"])
        if cs else "no identified callers")
    return 0


def _seconds_ago(text: str) -> float:
    """"30s", "5m", "2h", "1d" (a bare number: seconds) -> that many seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        if text and text[-1] in units:
            return float(text[:-1]) * units[text[-1]]
        return float(text)
    except ValueError:
        raise CliError(f"--since {text!r}: give a duration such as 30s, 5m, 2h or 1d") from None


def cmd_logs(args) -> int:
    client = _client(args)
    query = {}
    if args.instance:
        query["instance"] = args.instance
    if args.since:
        query["since"] = str(time.time() - _seconds_ago(args.since))
    while True:
        answer = client.call("GET", _svc(args.service) + "/logs?" + urlencode(query))
        for instance, _, line in answer["lines"]:
            print(f"{instance}  {line}", flush=True)
        if not args.follow:
            return 0
        query.pop("since", None)
        query["cursor"] = json.dumps(answer["cursor"])
        time.sleep(1.0)


# ------------------------------------------------------------------------- registration
def _common() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("gateway")
    g.add_argument("--gateway", default=os.environ.get("INFERGATE_GATEWAY", DEFAULT_GATEWAY),
                   help="the gateway's base URL (env INFERGATE_GATEWAY, default %(default)s)")
    g.add_argument("--admin-token", default=os.environ.get("INFERGATE_ADMIN_TOKEN", ""),
                   help="the gateway's admin token (env INFERGATE_ADMIN_TOKEN)")
    g.add_argument("--json", action="store_true", help="print the API's JSON instead of tables")
    return p


def _waiting(p) -> None:
    p.add_argument("--no-wait", dest="wait", action="store_false",
                   help="return at once instead of waiting until the service is running")
    p.add_argument("--timeout", type=float, default=120.0,
                   help="seconds to wait for Running (default %(default)s)")


def register(sub) -> None:
    common = _common()

    def add(name, help_, description, run, aliases=()):
        p = sub.add_parser(name, help=help_, description=description, parents=[common],
                           aliases=list(aliases))
        p.set_defaults(run=run)
        return p

    p = add("create", "create a service from a service.json",
            "Create a service from an EAS service.json. With model_path the gateway starts "
            "metadata.instance workers on its machine; with endpoints it fronts servers that "
            "run elsewhere. -r creates a blue-green service linked to the existing service of "
            "the same name (named NAME_<suffix>); shift traffic to it with release.", cmd_create)
    p.add_argument("service_json", metavar="service.json", help="the service description ('-' "
                                                                "reads stdin)")
    p.add_argument("-r", "--linked", action="store_true",
                   help="create a blue-green service linked to the existing one of that name")
    _waiting(p)

    p = add("release", "send N%% of the original's traffic to a linked service",
            "Blue-green release: the linked service (made with create -r) takes N% of the "
            "original endpoint's traffic and its own endpoint closes. -w 100 sends everything "
            "to it, -w 0 rolls back.", cmd_release)
    p.add_argument("service", help="the linked service (NAME_<suffix>)")
    p.add_argument("-w", "--weight", type=int, required=True, help="percent of traffic, 0-100")

    p = add("modify", "change a service's configuration",
            "Change a service: -Dkey=value for single settings (dotted paths, JSON values, "
            "repeatable), e.g. -Dmetadata.instance=3 scales without touching running "
            "instances; -s partial.json merges a partial service.json. A change of the model or "
            "processor (or their configuration) makes a new version (see version); instances "
            "and other metadata change the running one.", cmd_modify)
    p.add_argument("service")
    p.add_argument("-D", dest="define", action="append", metavar="KEY=VALUE",
                   help="set a dotted key, e.g. -Dmetadata.instance=3 (repeatable)")
    p.add_argument("-s", dest="service_json", metavar="partial.json",
                   help="merge this partial service.json")
    _waiting(p)

    p = add("desc", "describe a service",
            "Status, versions, instances with weights and health, traffic, rules, endpoint "
            "and token of a service.", cmd_desc)
    p.add_argument("service")

    add("list", "list services", "List the services of the gateway.", cmd_list, aliases=["ls"])

    for name, help_, done in (("stop", "stop a service (its endpoint answers 503)",
                               "Service is stopped"),
                              ("start", "start a stopped (or failed) service",
                               "Service is running")):
        p = add(name, help_, help_[0].upper() + help_[1:] + ".", _simple(name, done))
        p.add_argument("service")
        if name == "start":
            _waiting(p)
        else:
            p.set_defaults(wait=False, timeout=0)

    p = add("delete", "delete a service",
            "Delete a service and its instances. Deleting a linked service gives its traffic "
            "back to the original; deleting the original keeps its endpoint and sends all "
            "traffic to the linked service(s).", cmd_delete)
    p.add_argument("service")

    p = add("callers", "list, add or remove a service's identified callers",
            "ModelArts caller identities: each caller has its own token and user, domain and "
            "project names and ids; header rules read them as #USER_NAME, #USER_ID, "
            "#DOMAIN_NAME, #DOMAIN_ID, #PROJECT_NAME, #PROJECT_ID for requests that carry "
            "that caller's token. add prints the token (generated unless --token).",
            cmd_callers)
    p.add_argument("service")
    p.add_argument("action", nargs="?", choices=("list", "add", "remove"), default="list")
    p.add_argument("who", nargs="?", help="remove: the caller's token or user name")
    for key in CALLER_FIELDS:
        p.add_argument("--" + key.replace("_", "-"), dest=key)
    p.add_argument("--token", help="add: the caller's token (default: a new random one)")

    p = add("logs", "show the logs of a service's workers",
            "The logs of the workers this gateway runs for a service, and of those that "
            "stopped lately (kept and rotated by size), oldest line first.", cmd_logs)
    p.add_argument("service")
    p.add_argument("--instance", help="one instance: HOST:PORT or PORT")
    p.add_argument("--since", help="only lines of the last 30s, 5m, 2h, 1d...")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")

    p = add("version", "switch a service to one of its versions",
            "Switch a service to an earlier (or later) version; desc shows LatestVersion and "
            "CurrentVersion.", cmd_version)
    p.add_argument("service")
    p.add_argument("version", type=int)
    _waiting(p)

    p = add("traffic", "show or set the traffic shares of a service's versions",
            "ModelArts multi-version traffic: SERVICE=SHARE pairs naming existing services "
            "(the service itself included) whose shares sum to 100. Without pairs, show them.",
            cmd_traffic)
    p.add_argument("service")
    p.add_argument("shares", nargs="*", metavar="SERVICE=SHARE")

    p = add("rules", "show or set the header rules of a service",
            "ModelArts custom settings: a JSON list of up to 10 rules {\"condition\": "
            "\"#HEADER_version == '0.0.1'\", \"target\": SERVICE, \"header_name\": ..., "
            "\"header_value\": ...}; the first that holds picks the version. Without a file, "
            "show them.", cmd_rules)
    p.add_argument("service")
    p.add_argument("rules_json", nargs="?", metavar="rules.json", help="('-' reads stdin)")
    p.add_argument("--clear", action="store_true", help="remove every rule")

    p = add("instances", "list a service's instances",
            "The instances of a service with their weights, health and heartbeat age.",
            cmd_instances, aliases=["w"])
    p.add_argument("service")
