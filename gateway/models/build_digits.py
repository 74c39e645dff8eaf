"""Build the bundled digits model (and random-weight MLPs for benchmarks).

    python -m gateway.models.build_digits [--out PATH] [--hidden 64]

trains a 784 -> hidden (ReLU) -> 10 (softmax) MLP on the training split of
``gateway.models.load_digits_split()`` with scikit-learn (fixed random_state, so
the same library versions give the same weights), writes it as an ONNX graph built
with ``onnx.helper`` (MatMul/Add/Relu/Softmax, opset 13, IR version 7 so that old
onnxruntime releases load it), then checks the held-out accuracy with onnxruntime
and prints it. Exits non-zero when that accuracy is below 90%.

``build_mlp(path, ...)`` writes an untrained MLP with the same signature, for
benchmarks that want a heavier model; it needs only numpy and onnx.

Needs the test/dev dependencies (scikit-learn, onnx); the gateway itself never
imports this module.
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import numpy as np

from gateway.models import (DIGITS_MODEL, INPUT_NAME, OUTPUT_NAME, SIGNATURE_NAME,
                            load_digits_split)

OPSET = 13
IR_VERSION = 7
MIN_ACCURACY = 0.90


def _write_mlp(path, w1: np.ndarray, b1: np.ndarray, w2: np.ndarray, b2: np.ndarray,
               doc: str) -> Path:
    """Write images[N, in] -> Relu(x @ w1 + b1) @ w2 + b2 -> Softmax -> scores[N, out]."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    in_dim, hidden = w1.shape
    out_dim = w2.shape[1]
    assert b1.shape == (hidden,) and w2.shape[0] == hidden and b2.shape == (out_dim,)
    inits = [numpy_helper.from_array(np.ascontiguousarray(a, dtype=np.float32), name)
             for a, name in ((w1, "w1"), (b1, "b1"), (w2, "w2"), (b2, "b2"))]
    nodes = [
        helper.make_node("MatMul", [INPUT_NAME, "w1"], ["h_mm"], name="dense1_matmul"),
        helper.make_node("Add", ["h_mm", "b1"], ["h_pre"], name="dense1_bias"),
        helper.make_node("Relu", ["h_pre"], ["h"], name="dense1_relu"),
        helper.make_node("MatMul", ["h", "w2"], ["logits_mm"], name="dense2_matmul"),
        helper.make_node("Add", ["logits_mm", "b2"], ["logits"], name="dense2_bias"),
        helper.make_node("Softmax", ["logits"], [OUTPUT_NAME], name="softmax", axis=-1),
    ]
    graph = helper.make_graph(
        nodes, "mlp",
        inputs=[helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["batch", in_dim])],
        outputs=[helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT,
                                               ["batch", out_dim])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="infergate", producer_version="0.1.0",
                              doc_string=doc)
    model.ir_version = IR_VERSION
    model.model_version = 1
    helper.set_model_props(model, {"signature_name": SIGNATURE_NAME})
    onnx.checker.check_model(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(path))
    return path


def build_mlp(path, input_dim: int = 784, hidden: int = 2048, outputs: int = 10,
              seed: int = 0) -> Path:
    """Write a random-weight MLP with the digits signature (``images`` -> ``scores``).

    He-initialised weights from ``numpy.random.default_rng(seed)``; no training.
    Returns the path written.
    """
    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((input_dim, hidden), dtype=np.float32) * np.float32(
        np.sqrt(2.0 / input_dim))
    b1 = np.zeros(hidden, dtype=np.float32)
    w2 = rng.standard_normal((hidden, outputs), dtype=np.float32) * np.float32(
        np.sqrt(2.0 / hidden))
    b2 = np.zeros(outputs, dtype=np.float32)
    return _write_mlp(path, w1, b1, w2, b2,
                      doc=f"random-weight MLP {input_dim}-{hidden}-{outputs} (seed {seed}), "
                          "for benchmarks")


def train_digits(hidden: int = 64, seed: int = 0, max_iter: int = 300):
    """Train the MLP on the fixed training split; returns (w1, b1, w2, b2)."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier

    x_train, y_train, _, _ = load_digits_split()
    clf = MLPClassifier(hidden_layer_sizes=(hidden,), activation="relu", solver="adam",
                        alpha=1e-4, batch_size=64, learning_rate_init=1e-3,
                        max_iter=max_iter, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(x_train, y_train)
    if list(clf.classes_) != list(range(10)):
        raise RuntimeError(f"unexpected classes {clf.classes_}")
    (w1, w2), (b1, b2) = clf.coefs_, clf.intercepts_
    return w1, b1, w2, b2


def heldout_accuracy(path) -> float:
    """Accuracy of the ONNX model at ``path`` on the held-out split, with onnxruntime."""
    import onnxruntime as ort

    _, _, x_test, y_test = load_digits_split()
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    scores = sess.run([OUTPUT_NAME], {INPUT_NAME: x_test})[0]
    return float(np.mean(np.argmax(scores, axis=1) == y_test))


def build_digits(path=DIGITS_MODEL, hidden: int = 64, seed: int = 0,
                 max_iter: int = 300) -> Path:
    w1, b1, w2, b2 = train_digits(hidden=hidden, seed=seed, max_iter=max_iter)
    return _write_mlp(path, w1, b1, w2, b2,
                      doc=f"handwritten digits MLP 784-{hidden}-10 trained on scikit-learn's "
                          "digits (8x8 upsampled to 28x28, 0..1); input images[N, 784], "
                          "output scores[N, 10] (softmax)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gateway.models.build_digits",
                                     description="Train and write the bundled digits model.")
    parser.add_argument("--out", default=str(DIGITS_MODEL),
                        help="where to write the ONNX model (default: the bundled path)")
    parser.add_argument("--hidden", type=int, default=64, help="hidden units (default 64)")
    parser.add_argument("--seed", type=int, default=0, help="random_state (default 0)")
    parser.add_argument("--max-iter", type=int, default=300, help="training epochs (300)")
    args = parser.parse_args(argv)
    path = build_digits(args.out, hidden=args.hidden, seed=args.seed, max_iter=args.max_iter)
    acc = heldout_accuracy(path)
    print(f"wrote {path} ({path.stat().st_size} bytes); "
          f"held-out accuracy (onnxruntime, 360 samples): {acc:.4f}")
    if acc < MIN_ACCURACY:
        print(f"error: accuracy {acc:.4f} is below {MIN_ACCURACY}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
