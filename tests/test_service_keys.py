"""Unknown service.json keys are refused, naming the closest known key; EAS and ModelArts keys
infergate does not implement are accepted and listed as ignored (issue 22: a typo such as
`generate_tokn` used to create a service without authentication)."""
from __future__ import annotations

import json

import pytest

from conftest import Proc, free_port, infergate_cmd
from test_control_plane import ADMIN, admin, cli, cli_ok, write_json

from gateway.serviceconfig import ConfigError, check_keys, ignored_keys, validate_service

STATIC = {"endpoints": [{"ip": "127.0.0.1", "port": 9}]}   # fronts a server: nothing to launch


def refusal(config: dict) -> str:
    with pytest.raises(ConfigError) as err:
        validate_service({"name": "svc", **config})
    return str(err.value)


# ----------------------------------------------------------------------------- validate_service
# Typos at each level, and what a user is told (through validate_service and through a
# real gateway's CLI).
TYPOS = [
    ({"procesor": "json"}, "unknown key 'procesor': did you mean 'processor'?"),
    ({"metadata": {"instances": 3}},
     "unknown key 'metadata.instances': did you mean 'metadata.instance'?"),
    ({"metadata": {"rpc.keepalve": 500}},
     "unknown key 'metadata.rpc.keepalve': did you mean 'metadata.rpc.keepalive'?"),
    ({"metadata": {"rpc": {"keepalve": 500}}},
     "unknown key 'metadata.rpc.keepalve': did you mean 'metadata.rpc.keepalive'?"),
    ({"metadata": {"rate_limits": [{"key": "ip", "rat": 5}]}},
     "unknown key 'metadata.rate_limits[0].rat': did you mean 'metadata.rate_limits[0].rate'?"),
]


@pytest.mark.parametrize("config, message", TYPOS + [
    ({"generate_tokn": "true"}, "unknown key 'generate_tokn': did you mean 'generate_token'?"),
    ({"instance": 3}, "unknown key 'instance': did you mean 'metadata.instance'?"),
    ({"metadata": {"rcp.keepalive": 500}},
     "unknown key 'metadata.rcp.keepalive': did you mean 'metadata.rpc.keepalive'?"),
    ({**STATIC, "metadata": {"rate_limits": [{"key": "ip", "rate": 5, "brust": 10}]}},
     "unknown key 'metadata.rate_limits[0].brust': did you mean "
     "'metadata.rate_limits[0].burst'?"),
    ({"endpoints": [{"ip": "127.0.0.1", "port": 9, "wieght": 0}]},
     "unknown key 'endpoints[0].wieght': did you mean 'endpoints[0].weight'?"),
    ({"data_imge": "registry/x"}, "unknown key 'data_imge': did you mean 'data_image'?"),
])
def test_unknown_key_names_its_path_and_the_closest_key(config, message):
    assert refusal(config) == message


@pytest.mark.parametrize("config, path, listed", [
    ({"zzz": 1}, "zzz", "generate_token"),
    ({"metadata": {"zzz": 1}}, "metadata.zzz", "rpc.*"),
    ({"metadata": {"rpc": {"zzz": 1}}}, "metadata.rpc.zzz", "keepalive"),
    ({**STATIC, "metadata": {"rate_limits": [{"key": "ip", "rate": 1, "zzz": 1}]}},
     "metadata.rate_limits[0].zzz", "on_redis_error"),
])
def test_nothing_close_lists_the_keys_read_there(config, path, listed):
    message = refusal(config)
    assert message.startswith(f"unknown key '{path}' (infergate reads ")
    assert listed in message and "did you mean" not in message


def test_every_key_infergate_reads_is_accepted():
    config = {
        "name": "svc", "token": "t", "generate_token": "false", "model_path": "m.onnx",
        "model_entry": "m.onnx", "model_config": "{}", "processor": "tensorflow_cpu_1.15",
        "processor_type": None, "processor_entry": None, "processor_path": None,
        "upstream_path": None, "health_path": None, "env": {"A": "1"},
        "metadata": {"instance": 1, "cpu": 1, "gpu": 0, "memory": 2000, "workers": 5,
                     "processes": 1, "owner": "me", "signature_name": "serving_default",
                     "onnxruntime": {"cpu": {}},
                     "rate_limits": [{"key": "ip", "rate": 1, "burst": 2, "scope": "local",
                                      "on_redis_error": "open"}],
                     "rpc": {"batching": True, "max_batch_size": 8, "max_batch_timeout": 5,
                             "max_queue_size": 8, "keepalive": 100, "try_timeout": 50,
                             "io_threads": 1, "worker_threads": 2, "batch_sizes": [1, 2]}},
    }
    assert validate_service(config) is config
    assert check_keys(config) == []


def test_eas_and_modelarts_keys_are_accepted_and_listed_as_ignored():
    # The MediaFlow example of the EAS manual, and keys of the newer EAS JSON reference
    config = {"name": "video_asr", **STATIC, "oss_endpoint": "oss-cn-beijing.aliyuncs.com",
              "data_image": "registry/develop:latest", "description": "ModelArts' description",
              "cloud": {"computing": {"instance_type": "ecs.c6.large"}},
              "metadata": {"eas.handlers.disable_failure_handler": True,
                           "resource": "eas-r-xyz", "cuda": "9.0", "qos": "BestEffort",
                           "rpc.enable_jemalloc": True, "rpc.worker_threads": 30}}
    assert validate_service(config) is config
    assert check_keys(config) == [
        "oss_endpoint", "data_image", "description", "cloud", "metadata.eas.handlers."
        "disable_failure_handler", "metadata.resource", "metadata.cuda", "metadata.qos",
        "metadata.rpc.enable_jemalloc"]


def test_null_means_not_set():
    """modify -s {"key": null} unsets a key: a stored typo can be cleared that way."""
    config = {"name": "svc", "generate_tokn": None, "metadata": {"instances": None}}
    assert validate_service(config) is config and check_keys(config) == []


def test_desc_of_a_service_stored_before_keys_were_checked_lists_its_unknown_keys():
    assert ignored_keys({"name": "old", "generate_tokn": "true", "data_image": "x",
                         "metadata": {"rpc": {"keepalve": 1}}}) == [
        "generate_tokn", "data_image", "metadata.rpc.keepalve"]


# ----------------------------------------------------------------------------- a real gateway
@pytest.fixture(scope="module")
def gw(tmp_path_factory):
    port = free_port()
    proc = Proc(infergate_cmd("gateway", "--host", "127.0.0.1", "--port", str(port),
                              "--admin-token", ADMIN, "--state-dir",
                              str(tmp_path_factory.mktemp("state"))), port)
    proc.files = tmp_path_factory.mktemp("files")
    yield proc
    proc.stop()


def services(gw) -> list:
    return [v["name"] for v in json.loads(cli_ok(gw.url, "list", "--json"))]


def test_admin_api_refuses_generate_tokn_and_creates_nothing(gw):
    status, body = admin(gw.url, "POST", "/admin/services",
                         {"name": "typo", **STATIC, "generate_tokn": "true"})
    assert status == 400, body
    assert body["message"] == "unknown key 'generate_tokn': did you mean 'generate_token'?"
    assert "typo" not in services(gw)


@pytest.mark.parametrize("config, message", TYPOS)
def test_cli_create_refuses_unknown_keys_in_one_line(gw, config, message):
    res = cli(gw.url, "create", write_json(gw.files / "service.json",
                                           {"name": "typo", **STATIC, **config}))
    assert res.returncode == 1
    assert res.stderr == f"infergate create: {message} (HTTP 400)\n"
    assert "typo" not in services(gw)


def test_ignored_keys_in_the_create_answer_and_in_desc(gw):
    config = {"name": "from_eas", **STATIC, "data_image": "registry/develop:latest",
              "metadata": {"resource": "eas-r-xyz", "rpc.enable_jemalloc": True}}
    ignored = ["data_image", "metadata.resource", "metadata.rpc.enable_jemalloc"]
    status, view = admin(gw.url, "POST", "/admin/services", config)
    assert status == 201 and view["ignored"] == ignored, view
    status, view = admin(gw.url, "GET", "/admin/services/from_eas")
    assert status == 200 and view["ignored"] == ignored
    assert json.loads(cli_ok(gw.url, "desc", "from_eas", "--json"))["ignored"] == ignored
    assert "Ignored" in cli_ok(gw.url, "desc", "from_eas") and ", ".join(ignored) in cli_ok(
        gw.url, "desc", "from_eas")


def test_cli_create_warns_of_ignored_keys(gw):
    res = cli(gw.url, "create", write_json(gw.files / "service.json",
                                           {"name": "warned", **STATIC, "oss_endpoint": "x"}))
    assert res.returncode == 0, res.stderr
    assert "[WARN] Ignored (accepted, not implemented by infergate): oss_endpoint" in res.stderr


def test_modify_refuses_unknown_keys_and_changes_nothing(gw):
    cli_ok(gw.url, "create", write_json(gw.files / "service.json", {"name": "kept", **STATIC}))
    before = admin(gw.url, "GET", "/admin/services/kept")[1]
    res = cli(gw.url, "modify", "kept", "-Dmetadata.instances=3")
    assert res.returncode == 1
    assert "unknown key 'metadata.instances': did you mean 'metadata.instance'?" in res.stderr
    res = cli(gw.url, "modify", "kept", "-Dmetadata.rpc.keepalve=100")
    assert "unknown key 'metadata.rpc.keepalve': did you mean 'metadata.rpc.keepalive'?" in (
        res.stderr)
    res = cli(gw.url, "modify", "kept", "-s", write_json(
        gw.files / "partial.json", {"metadata": {"rpc": {"keepalve": 100}}}))
    assert "unknown key 'metadata.rpc.keepalve'" in res.stderr
    status, body = admin(gw.url, "POST", "/admin/services/kept/modify",
                         {"patch": {"generate_tokn": "true"}})
    assert status == 400 and "did you mean 'generate_token'?" in body["message"]
    after = admin(gw.url, "GET", "/admin/services/kept")[1]
    assert (after["config"], after["revision"], after["token"]) == (
        before["config"], before["revision"], before["token"])
    # and an ignored key passes, listed in the answer
    status, view = admin(gw.url, "POST", "/admin/services/kept/modify",
                         {"set": {"metadata.qos": "BestEffort"}})
    assert status == 200 and view["ignored"] == ["metadata.qos"], view


def test_a_global_limit_on_the_embedded_store_is_flagged(gw):
    """scope "global" needs Redis: on the embedded store the create answer, the CLI and
    desc say that each gateway process counts it alone; a local limit is not flagged."""
    limits = [{"key": "ip", "rate": 5, "burst": 5},
              {"key": "service", "rate": 50, "burst": 50, "scope": "global"}]
    res = cli(gw.url, "create", write_json(gw.files / "service.json", {
        "name": "limited", **STATIC, "metadata": {"rate_limits": limits}}))
    assert res.returncode == 0, res.stderr
    assert "[WARN] metadata.rate_limits[1] has scope 'global', which needs a Redis store" \
        in res.stderr and "rate_limits[0]" not in res.stderr
    view = json.loads(cli_ok(gw.url, "desc", "limited", "--json"))
    assert len(view["warnings"]) == 1 and "each gateway process counts it alone" in \
        view["warnings"][0]
    assert "Warning" in cli_ok(gw.url, "desc", "limited")
