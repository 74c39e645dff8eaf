"""The bundled digits model: signature, accuracy, and the benchmark MLP builder."""
import subprocess
import sys

import numpy as np
import pytest

ort = pytest.importorskip("onnxruntime")

from gateway.models import (DIGITS_MODEL, SIGNATURE_NAME, load_digits_split,  # noqa: E402
                            to_mnist_layout)


@pytest.fixture(scope="module")
def session():
    return ort.InferenceSession(str(DIGITS_MODEL), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def split():
    pytest.importorskip("sklearn")
    return load_digits_split()


def test_model_is_shipped_and_small():
    assert DIGITS_MODEL.is_file()
    assert DIGITS_MODEL.name == "digits.onnx"
    assert DIGITS_MODEL.stat().st_size < 1024 * 1024
    assert SIGNATURE_NAME == "predict_images"


def test_signature(session):
    inputs, outputs = session.get_inputs(), session.get_outputs()
    assert [i.name for i in inputs] == ["images"]
    assert inputs[0].type == "tensor(float)"
    assert inputs[0].shape == ["batch", 784]
    assert [o.name for o in outputs] == ["scores"]
    assert outputs[0].type == "tensor(float)"
    assert outputs[0].shape == ["batch", 10]
    meta = session.get_modelmeta()
    assert meta.custom_metadata_map.get("signature_name") == "predict_images"


def test_onnx_file_loads_on_older_runtimes():
    onnx = pytest.importorskip("onnx")
    model = onnx.load(str(DIGITS_MODEL))
    assert model.ir_version <= 9
    opsets = {o.domain: o.version for o in model.opset_import}
    assert 13 <= opsets[""] <= 17
    onnx.checker.check_model(model)


@pytest.mark.parametrize("batch", [1, 7])
def test_scores_are_probabilities_for_any_batch(session, batch):
    x = np.random.default_rng(0).random((batch, 784), dtype=np.float32)
    (scores,) = session.run(["scores"], {"images": x})
    assert scores.shape == (batch, 10) and scores.dtype == np.float32
    assert np.all(scores >= 0)
    np.testing.assert_allclose(scores.sum(axis=1), 1.0, rtol=1e-5)


def test_heldout_accuracy(session, split):
    _, _, x_test, y_test = split
    (scores,) = session.run(["scores"], {"images": x_test})
    accuracy = float(np.mean(np.argmax(scores, axis=1) == y_test))
    print(f"digits held-out accuracy: {accuracy:.4f} on {len(y_test)} samples")
    assert accuracy >= 0.90


def test_split_is_fixed(split):
    x_train, y_train, x_test, y_test = split
    assert x_train.shape == (1437, 784) and x_test.shape == (360, 784)
    assert x_train.dtype == np.float32 and y_train.dtype == np.int64
    assert 0.0 <= x_train.min() and x_train.max() <= 1.0
    assert set(np.unique(y_test)) == set(range(10))
    again = load_digits_split()
    for a, b in zip(split, again):
        np.testing.assert_array_equal(a, b)


def test_to_mnist_layout():
    img = np.zeros((8, 8))
    img[3, 4] = 16
    out = to_mnist_layout(img)
    assert out.shape == (1, 784) and out.dtype == np.float32
    assert out.max() <= 1.0 and out.min() == 0.0
    peak = np.unravel_index(np.argmax(out.reshape(28, 28)), (28, 28))
    assert abs(peak[0] - 3.5 * 28 / 8) <= 2 and abs(peak[1] - 4.5 * 28 / 8) <= 2
    flat = to_mnist_layout(np.stack([img, img]).reshape(2, 64))
    np.testing.assert_array_equal(flat, np.concatenate([out, out]))
    np.testing.assert_array_equal(to_mnist_layout(np.full((8, 8), 16.0)), np.ones((1, 784)))
    with pytest.raises(ValueError):
        to_mnist_layout(np.zeros((3, 5)))


def test_build_mlp_writes_a_runnable_model(tmp_path):
    pytest.importorskip("onnx")
    from gateway.models.build_digits import build_mlp

    path = build_mlp(tmp_path / "mlp.onnx", hidden=256, seed=1)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["images"]
    assert sess.get_inputs()[0].shape == ["batch", 784]
    assert sess.get_modelmeta().custom_metadata_map.get("signature_name") == "predict_images"
    x = np.random.default_rng(1).random((5, 784), dtype=np.float32)
    (scores,) = sess.run(["scores"], {"images": x})
    assert scores.shape == (5, 10)
    np.testing.assert_allclose(scores.sum(axis=1), 1.0, rtol=1e-5)

    small = build_mlp(tmp_path / "small.onnx", input_dim=12, hidden=8, outputs=3)
    sess = ort.InferenceSession(str(small), providers=["CPUExecutionProvider"])
    (scores,) = sess.run(None, {"images": np.ones((2, 12), np.float32)})
    assert scores.shape == (2, 3)
    # same seed, same bytes
    again = build_mlp(tmp_path / "small2.onnx", input_dim=12, hidden=8, outputs=3)
    assert small.read_bytes() == again.read_bytes()


def test_import_needs_no_dev_dependencies():
    code = ("import sys, gateway.models as m; m.DIGITS_MODEL; "
            "bad = [x for x in ('sklearn', 'onnx', 'scipy') if x in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
