"""The encoders as ONNX graphs, through jax2onnx, with their weights as initializers; run by onnxruntime."""

from __future__ import annotations

import logging
import os

import jax
import numpy as np

from dualenc.errors import DualEncError
from dualenc.export.encoders import Encoder

OPSET = 21
# Above this many bytes of weights, they go to a `.onnx.data` file beside the graph (protobuf's 2 GiB limit).
EXTERNAL_DATA_BYTES = 1 << 30


class ExportError(DualEncError):
    """An encoder that could not be converted, naming the operation."""


def to_onnx(encoder: Encoder, opset: int = OPSET):
    """encoder as an onnx.ModelProto whose inputs are encoder.inputs (the batch dimension named "batch") and
    whose output is encoder.output; the weights are initializers.

    jax2onnx converts the program dualenc's own trace gives (jax.make_jaxpr of the encoder, replayed), so it
    sees the primitives jax.jit compiles, not its own rewrites of jnp functions (its jnp.take has no
    fill_value, which the towers use to make out-of-vocabulary ids NaN).
    """
    try:
        import jax2onnx
    except ImportError:
        raise ImportError("ONNX export needs jax2onnx, onnx and onnxruntime: pip install 'dualenc[onnx]'") from None
    specs = list(encoder.inputs.values())
    closed = jax.make_jaxpr(encoder.embedded())(*specs)

    def replay(*inputs):
        return jax.core.eval_jaxpr(closed.jaxpr, closed.consts, *inputs)[0]

    quiet = logging.getLogger("onnx_ir")  # it warns for every untyped shape constant it skips
    level, quiet.level = quiet.level, logging.ERROR
    try:
        proto = jax2onnx.to_onnx(replay, specs, model_name=f"dualenc_{encoder.name}_encoder", opset=opset,
                                 input_names=list(encoder.inputs), output_names=[encoder.output])
    except (NotImplementedError, TypeError, ValueError, KeyError) as e:
        raise ExportError(f"the {encoder.name} encoder does not convert to ONNX: {type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}") from e
    finally:
        quiet.level = level
    bool_where(proto)
    return proto


def bool_where(proto) -> int:
    """Rewrites each Where on bool tensors (jnp.tril of a bool mask gives one: CLIP's causal mask) as
    Or(And(c, x), And(Not(c), y)), the same values: onnxruntime has no CPU kernel for a bool Where. Returns
    how many it rewrote."""
    import onnx
    from onnx import TensorProto, helper

    graph = proto.graph
    types = {v.name: v.type.tensor_type.elem_type for v in (*graph.value_info, *graph.input, *graph.output)}
    types.update({t.name: t.data_type for t in graph.initializer})
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].t.data_type:
            types[node.output[0]] = node.attribute[0].t.data_type
    nodes, rewritten = [], 0
    for node in graph.node:
        if node.op_type != "Where" or types.get(node.input[1]) != TensorProto.BOOL:
            nodes.append(node)
            continue
        c, x, y = node.input
        out, tag = node.output[0], f"{node.name or out}_bool"
        nodes += [helper.make_node("And", [c, x], [f"{tag}_x"], name=f"{tag}_and_x"),
                  helper.make_node("Not", [c], [f"{tag}_not"], name=f"{tag}_not"),
                  helper.make_node("And", [f"{tag}_not", y], [f"{tag}_y"], name=f"{tag}_and_y"),
                  helper.make_node("Or", [f"{tag}_x", f"{tag}_y"], [out], name=f"{tag}_or")]
        rewritten += 1
    if rewritten:
        del graph.node[:]
        graph.node.extend(nodes)
        onnx.checker.check_model(proto)
    return rewritten


def save(proto, path: str) -> list[str]:
    """Writes the graph to `path` (and its weights to `path`.data when they are large); returns the file names."""
    import onnx

    size = sum(t.ByteSize() for t in proto.graph.initializer)
    if size <= EXTERNAL_DATA_BYTES:
        onnx.save_model(proto, path)
        return [os.path.basename(path)]
    data = os.path.basename(path) + ".data"
    onnx.save_model(proto, path, save_as_external_data=True, all_tensors_to_one_file=True, location=data)
    return [os.path.basename(path), data]


def session(path: str):
    """An onnxruntime CPU session for a saved graph."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    return onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def run(sess, inputs: dict[str, np.ndarray]) -> np.ndarray:
    return sess.run(None, inputs)[0]
