"""service.json validation: every refusal is one message naming the field."""
import pytest

from gateway.serviceconfig import ConfigError, validate_service

OK_EP = {"ip": "10.0.0.5", "port": 8000, "weight": 100}


@pytest.mark.parametrize("extra, field", [
    ({"endpoints": [{"ip": "10.0.0.5", "port": 0}]}, "endpoints[0].port"),
    ({"endpoints": [{"ip": "10.0.0.5", "port": 65536}]}, "endpoints[0].port"),
    ({"endpoints": [OK_EP, {"ip": "10.0.0.6", "port": -1}]}, "endpoints[1].port"),
    ({"endpoints": [{"ip": "10.0.0.5", "port": "http"}]}, "endpoints[0].port"),
    ({"endpoints": [{"ip": "", "port": 80}]}, "endpoints[0].ip"),
    ({"endpoints": [{"ip": "   ", "port": 80}]}, "endpoints[0].ip"),
    ({"endpoints": [{"port": 80}]}, "endpoints[0].ip"),
    ({"endpoints": [{"ip": "10.0.0.5/x", "port": 80}]}, "endpoints[0].ip"),
    ({"endpoints": ["10.0.0.5:80"]}, "endpoints[0]"),
    ({"endpoints": [{"ip": "10.0.0.5", "port": 80, "weight": -1}]}, "endpoints[0].weight"),
    ({"endpoints": [OK_EP], "upstream_path": "infer"}, "upstream_path"),
    ({"endpoints": [OK_EP], "upstream_path": 7}, "upstream_path"),
    ({"endpoints": [OK_EP], "upstream_path": ""}, "upstream_path"),
    ({"endpoints": [OK_EP], "upstream_path": "/v1/\u6a21\u578b"}, "upstream_path"),
    ({"endpoints": [OK_EP], "upstream_path": "/a\r\nX-Injected: 1"}, "upstream_path"),
    ({"endpoints": [OK_EP], "upstream_path": "/a b"}, "upstream_path"),
    ({"endpoints": [OK_EP], "health_path": "health"}, "health_path"),
    ({"endpoints": [OK_EP], "health_path": False}, "health_path"),
    ({"endpoints": [OK_EP], "health_path": "/h\u00e9\u20ac"}, "health_path"),
])
def test_refused_with_the_field_named(extra, field):
    with pytest.raises(ConfigError) as err:
        validate_service({"name": "svc", **extra})
    message = str(err.value)
    assert message.startswith(field) and "\n" not in message, message


@pytest.mark.parametrize("extra", [
    {"endpoints": [{"ip": "10.0.0.5", "port": 1}, {"ip": "::1", "port": 65535, "weight": 0}]},
    {"endpoints": [{"ip": "triton.internal", "port": "8000"}]},
    {"endpoints": [OK_EP], "upstream_path": "/v2/models/resnet/infer"},
    {"endpoints": [OK_EP], "upstream_path": "/caf%C3%A9"},
    {"endpoints": [OK_EP], "upstream_path": None},
    {"endpoints": [OK_EP], "health_path": "/v2/health/ready"},
    {"endpoints": [OK_EP], "health_path": ""},     # TCP connect check only
    {"endpoints": [OK_EP], "health_path": None},
])
def test_accepted(extra):
    config = {"name": "svc", **extra}
    assert validate_service(config) is config


def test_instance_count_is_bounded():
    from gateway.serviceconfig import MAX_INSTANCES, ConfigError, validate_service

    base = {"name": "s", "model_path": "m.onnx"}
    validate_service({**base, "metadata": {"instance": MAX_INSTANCES}})
    with pytest.raises(ConfigError, match="metadata.instance must be at most"):
        validate_service({**base, "metadata": {"instance": MAX_INSTANCES + 1}})
