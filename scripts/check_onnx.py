"""Checks an ONNX file written by `mura export --onnx` with the real clients: onnx's checker (full
check, shape inference included) and onnxruntime's CPU execution provider.

    python check_onnx.py MODEL.onnx INPUTS.f32 EXPECTED.f32

INPUTS.f32: the `image` input of N views, [N, 3, s, s] little-endian float32; EXPECTED.f32: the
N logits mura's own forward gives them. Runs the model on the first view alone (batch 1) and on
all N (the batch dimension is dynamic) and prints one JSON line: what the file declares (IR
version, opsets, operators, inputs, outputs, metadata) and, per batch size, the output shapes
and the largest |onnxruntime - mura| of the logits and of the probabilities (mura's probability
being the sigmoid of its logit). The caller (tests/cli/export.rs) judges the numbers; this
script fails only if a client refuses the file. Needs numpy, onnx and onnxruntime (CI installs
pinned versions, see .ci/run).
"""

import json
import sys

import numpy as np
import onnx
import onnxruntime as ort


def dims(value_info):
    """A graph input's or output's shape: ints, or the names of symbolic dimensions."""
    shape = value_info.type.tensor_type.shape.dim
    return [d.dim_param if d.HasField("dim_param") else d.dim_value for d in shape]


def main(model_path, inputs_path, expected_path):
    model = onnx.load(model_path)
    onnx.checker.check_model(model, full_check=True)
    graph = model.graph
    (image,) = graph.input
    x = np.fromfile(inputs_path, dtype="<f4").reshape([-1] + dims(image)[1:])
    expected = np.fromfile(expected_path, dtype="<f4").astype(np.float64)
    assert len(expected) == len(x), "one expected logit per view"
    session = ort.InferenceSession(model_path, providers=["CPUExecutionProvider"])
    runs = {}
    for batch in (1, len(x)):
        logit, prob = session.run(["logit", "probability"], {image.name: x[:batch]})
        want = expected[:batch]
        runs[str(batch)] = {
            "logit_shape": list(logit.shape),
            "probability_shape": list(prob.shape),
            "max_abs_logit_delta": float(np.abs(logit[:, 0] - want).max()),
            "max_abs_probability_delta": float(
                np.abs(prob[:, 0] - 1.0 / (1.0 + np.exp(-want))).max()
            ),
        }
    print(
        json.dumps(
            {
                "onnx": onnx.__version__,
                "onnxruntime": ort.__version__,
                "ir_version": model.ir_version,
                "opsets": {o.domain: o.version for o in model.opset_import},
                "ops": sorted({n.op_type for n in graph.node}),
                "inputs": {v.name: dims(v) for v in graph.input},
                "outputs": {v.name: dims(v) for v in graph.output},
                "metadata": {p.key: p.value for p in model.metadata_props},
                "runs": runs,
            }
        )
    )


if __name__ == "__main__":
    main(*sys.argv[1:])
