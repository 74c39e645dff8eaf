"""The control-plane commands: help, argument handling, one-line errors, output.

Most run in-process (gateway.cli.main.main); the last ones drive a real gateway
whose services front static endpoints, so no workers are started.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import free_port, infergate_cmd

from gateway.cli import control_cmds
from gateway.cli.errors import CliError
from gateway.cli.main import build_parser, main

COMMANDS = ["create", "release", "modify", "desc", "list", "ls", "stop", "start", "delete",
            "version", "traffic", "rules", "instances"]
ADMIN = "cli-secret"


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: infergate") and "--gateway" in out and "--admin-token" in out


def test_defaults_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("INFERGATE_GATEWAY", "http://gw.example:9000")
    monkeypatch.setenv("INFERGATE_ADMIN_TOKEN", "t0k")
    args = build_parser().parse_args(["list"])
    assert args.gateway == "http://gw.example:9000" and args.admin_token == "t0k"
    args = build_parser().parse_args(["desc", "svc", "--gateway", "http://other:1"])
    assert args.gateway == "http://other:1" and args.service == "svc"


def test_dash_d_values_are_json_when_they_parse():
    args = build_parser().parse_args(["modify", "svc", "-Dmetadata.instance=3",
                                      "-Dmetadata.rpc.batching=true", "-Dmetadata.note=hello world",
                                      '-Dmetadata.tags={"a": [1, 2]}', "-Dmetadata.expr=a=b"])
    assert control_cmds.parse_defines(args.define) == {
        "metadata.instance": 3, "metadata.rpc.batching": True, "metadata.note": "hello world",
        "metadata.tags": {"a": [1, 2]}, "metadata.expr": "a=b"}
    with pytest.raises(CliError):
        control_cmds.parse_defines(["metadata.instance"])
    with pytest.raises(CliError):
        control_cmds.parse_defines(["=3"])


def one_line_error(capsys, argv) -> str:
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_unreachable_gateway_is_one_line(capsys):
    gateway = f"http://127.0.0.1:{free_port()}"
    line = one_line_error(capsys, ["list", "--gateway", gateway])
    assert line.startswith("infergate list: cannot reach the gateway at " + gateway)


def test_local_input_errors_are_one_line(capsys, tmp_path):
    gw = ["--gateway", f"http://127.0.0.1:{free_port()}"]
    assert "cannot read service.json" in one_line_error(
        capsys, ["create", str(tmp_path / "missing.json"), *gw])
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert "not valid JSON" in one_line_error(capsys, ["create", str(bad), *gw])
    bad.write_text("[1, 2]")
    assert "JSON object" in one_line_error(capsys, ["create", str(bad), *gw])
    assert "nothing to modify" in one_line_error(capsys, ["modify", "svc", *gw])
    assert "SERVICE=SHARE" in one_line_error(capsys, ["traffic", "svc", "a:50", *gw])
    assert "integer" in one_line_error(capsys, ["traffic", "svc", "a=half", *gw])


def test_relative_model_paths_are_relative_to_the_service_json(tmp_path):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "m.onnx").write_bytes(b"x")
    spec = tmp_path / "service.json"
    config = control_cmds._resolve_local_paths(
        {"name": "s", "model_path": "models/m.onnx", "processor_path": "nope/"}, str(spec))
    assert config["model_path"] == str(tmp_path / "models" / "m.onnx")
    assert config["processor_path"] == "nope/"  # left alone: no such file here


def test_table_rendering():
    text = control_cmds._table([["a", 1], ["long name", None]], ["Name", "N"])
    lines = text.splitlines()
    assert len({len(line) for line in lines}) == 1
    assert "| long name | " in text and "| Name      | N |" in text


# ----------------------------------------------------------------------------- against a gateway
@pytest.fixture
def gateway(procs, tmp_path):
    port = free_port()
    return procs.start(infergate_cmd("gateway", "--host", "127.0.0.1", "--port", str(port),
                                     "--state-dir", str(tmp_path / "state"),
                                     "--admin-token", ADMIN), port)


def run_cli(url, *args, token=ADMIN):
    env = dict(os.environ, INFERGATE_GATEWAY=url, INFERGATE_ADMIN_TOKEN=token)
    return subprocess.run(infergate_cmd(*args), capture_output=True, text=True, env=env,
                          timeout=60)


def test_commands_against_a_gateway(gateway, tmp_path):
    spec = tmp_path / "service.json"
    spec.write_text(json.dumps({"name": "ext", "token": "svc-token", "endpoints": [
        {"ip": "127.0.0.1", "port": 9, "weight": 100}], "metadata": {"instance": 1}}))
    res = run_cli(gateway.url, "create", str(spec))
    assert res.returncode == 0, res.stderr
    assert "/api/predict/ext" in res.stdout and "svc-token" in res.stdout

    res = run_cli(gateway.url, "create", str(spec), token="wrong")
    assert res.returncode == 1 and "admin token" in res.stderr and "401" in res.stderr

    listing = run_cli(gateway.url, "list").stdout
    assert "ext" in listing and "Running" in listing and listing.startswith("+")
    assert json.loads(run_cli(gateway.url, "ls", "--json").stdout)[0]["name"] == "ext"

    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps({"metadata": {"rpc": {"keepalive": 2000}}}))
    res = run_cli(gateway.url, "modify", "ext", "-s", str(partial), "-Dmetadata.cpu=2")
    assert res.returncode == 0, res.stderr
    view = json.loads(run_cli(gateway.url, "desc", "ext", "--json").stdout)
    assert view["revision"] == 1  # metadata changes the running version
    assert view["config"]["metadata"]["rpc.keepalive"] == 2000
    assert view["config"]["metadata"]["cpu"] == 2 and view["instances"][0]["port"] == 9
    text = run_cli(gateway.url, "desc", "ext").stdout
    assert "LatestVersion" in text and "127.0.0.1:9" in text and "svc-token" in text

    assert "ext" in run_cli(gateway.url, "traffic", "ext").stdout
    assert "no rules" in run_cli(gateway.url, "rules", "ext").stdout
    assert "127.0.0.1:9" in run_cli(gateway.url, "instances", "ext").stdout

    assert run_cli(gateway.url, "stop", "ext").returncode == 0
    assert json.loads(run_cli(gateway.url, "desc", "ext", "--json").stdout)["status"] == "Stopped"
    assert run_cli(gateway.url, "start", "ext").returncode == 0
    assert json.loads(run_cli(gateway.url, "desc", "ext", "--json").stdout)["status"] == "Running"
    res = run_cli(gateway.url, "version", "ext", "2")
    assert res.returncode == 1 and "no version 2" in res.stderr

    res = run_cli(gateway.url, "desc", "nope")
    assert res.returncode == 1 and res.stderr.strip() == (
        "infergate desc: service 'nope' does not exist (HTTP 404)")
    assert run_cli(gateway.url, "delete", "ext").returncode == 0
    assert json.loads(run_cli(gateway.url, "list", "--json").stdout) == []


def test_admin_client_never_uses_a_proxy(gateway, monkeypatch):
    """With http_proxy set, the admin token must not go to the proxy: urllib would
    send every admin call (token included) there, even for a gateway on 127.0.0.1."""
    import socket
    import threading

    proxy = socket.socket()
    proxy.bind(("127.0.0.1", 0))
    proxy.listen(8)
    proxy.settimeout(0.2)
    seen = []
    done = threading.Event()

    def serve():
        while not done.is_set():
            try:
                conn, _ = proxy.accept()
            except OSError:
                continue
            with conn:
                conn.settimeout(1)
                try:
                    seen.append(conn.recv(4096))
                    conn.sendall(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")
                except OSError:
                    pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    proxy_url = f"http://127.0.0.1:{proxy.getsockname()[1]}"
    for var in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.setenv(var, proxy_url)
    for var in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(var, raising=False)
    try:
        client = control_cmds.AdminClient(gateway.url, ADMIN)
        assert client.call("GET", "/admin/services") == []
        # A gateway given by name goes direct as well.
        client = control_cmds.AdminClient(gateway.url.replace("127.0.0.1", "localhost"), ADMIN)
        assert client.call("GET", "/admin/services") == []
    finally:
        done.set()
        thread.join(2)
        proxy.close()
    assert seen == []


def test_gateway_url_with_ipv6_host():
    assert control_cmds.AdminClient("http://[::1]:8080").base == "http://[::1]:8080"
    assert control_cmds.AdminClient("::1:8080").base == "http://[::1]:8080"
    assert control_cmds.AdminClient("127.0.0.1:9").base == "http://127.0.0.1:9"


def test_create_waits_for_a_gateway_that_is_starting(tmp_path):
    """`infergate gateway & infergate create svc.json`: create tries a refused connection
    again for a few seconds, and the gateway says where it listens once it does."""
    import time

    from conftest import Proc

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    spec = tmp_path / "static.json"
    spec.write_text(json.dumps({"name": "static", "endpoints": [
        {"ip": "127.0.0.1", "port": free_port(), "weight": 1}]}))
    create = subprocess.Popen(infergate_cmd("create", str(spec), "--gateway", url),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.5)
    gateway = Proc(infergate_cmd("gateway", "--port", str(port), "--state-dir",
                                 str(tmp_path / "state")), port)
    try:
        out, err = create.communicate(timeout=30)
        assert create.returncode == 0, err
        assert f"gateway listening on {url}" in gateway.output()
    finally:
        gateway.stop()


def test_version():
    from gateway import __version__

    proc = subprocess.run(infergate_cmd("--version"), capture_output=True, text=True, timeout=30)
    assert (proc.returncode, proc.stdout.strip()) == (0, f"infergate {__version__}")


def test_demo_without_a_model_runtime_says_which_extra_at_once(tmp_path):
    """Without onnxruntime (hidden from the process), demo fails in one line naming the
    extra to install, before launching anything; a gateway starts and warns once."""
    hide = "import sys; sys.modules['onnxruntime'] = None; from gateway.cli.main import main; "
    proc = subprocess.run([sys.executable, "-c", hide + "sys.exit(main(['demo']))"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "infergate demo: onnxruntime is not installed: pip install 'infergate[cpu]', or "
        "'infergate[gpu]' for CUDA"]
    assert proc.stdout == ""
    from conftest import Proc

    port = free_port()
    gateway = Proc([sys.executable, "-c", hide + f"sys.exit(main(['gateway', '--port', "
                    f"'{port}', '--state-dir', {str(tmp_path / 'state')!r}]))"], port)
    try:
        assert gateway.output().count("onnxruntime is not installed") == 1
    finally:
        gateway.stop()


def test_models_lists_the_bundled_model_and_prints_its_path():
    from gateway.models import DIGITS_MODEL

    listed = subprocess.run(infergate_cmd("models"), capture_output=True, text=True, timeout=30)
    assert listed.returncode == 0 and listed.stdout.startswith(f"digits\t{DIGITS_MODEL}\t")
    path = subprocess.run(infergate_cmd("models", "--path", "digits"), capture_output=True,
                          text=True, timeout=30)
    assert (path.returncode, path.stdout) == (0, f"{DIGITS_MODEL}\n")
    unknown = subprocess.run(infergate_cmd("models", "--path", "resnet"), capture_output=True,
                             text=True, timeout=30)
    assert unknown.returncode == 1 and "no bundled model 'resnet'" in unknown.stderr
