"""Make an ONNX model's random-number nodes take their noise from an input, so a seed fixes the output.

onnxruntime's RandomNormalLike keeps one generator per session that advances on every run, so the
same utterance sounds different depending on what was synthesized before it. `seed_random_nodes`
rewrites each RandomNormalLike / RandomUniformLike node into a slice of a new float input
``noise_bank``: node k reads ``bank[k * stride : k * stride + size(x)]`` reshaped to x's shape (then
scaled and shifted, or mapped to the uniform range, as the node's attributes say). The caller fills
the bank from its own seeded generator (`noise_bank`).
"""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from streamer.errors import SynthesisError

BANK_INPUT = "noise_bank"
_RANDOM_OPS = {"RandomNormalLike", "RandomUniformLike"}


def seed_random_nodes(model: onnx.ModelProto, stride: int) -> int:
    """Rewrite the model in place; returns how many random nodes now read from ``noise_bank``.

    Args:
        model: an ONNX model (default domain opset 13 or later: Slice, Reshape, ReduceProd).
        stride: bank values reserved per random node; the largest noise tensor must fit.

    Raises:
        SynthesisError: a random op that takes no input shape (RandomNormal, RandomUniform) is present.
    """
    graph = model.graph
    fixed = [n for n in graph.node if n.op_type in ("RandomNormal", "RandomUniform")]
    if fixed:
        raise SynthesisError(f"cannot seed {fixed[0].op_type} node {fixed[0].name!r}")
    count = 0
    new_nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        if node.op_type not in _RANDOM_OPS:
            new_nodes.append(node)
            continue
        new_nodes.extend(_replacement(node, count, stride))
        count += 1
    if count:
        del graph.node[:]
        graph.node.extend(new_nodes)
        graph.input.append(helper.make_tensor_value_info(BANK_INPUT, TensorProto.FLOAT, [None]))
    return count


def _replacement(node: onnx.NodeProto, index: int, stride: int) -> list[onnx.NodeProto]:
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    p = f"/seeded_noise_{index}"
    start = numpy_helper.from_array(np.array([index * stride], np.int64))
    nodes = [
        helper.make_node("Shape", [node.input[0]], [f"{p}/shape"]),
        helper.make_node("ReduceProd", [f"{p}/shape"], [f"{p}/size"], keepdims=1),
        helper.make_node("Constant", [], [f"{p}/start"], value=start),
        helper.make_node("Add", [f"{p}/start", f"{p}/size"], [f"{p}/end"]),
        helper.make_node("Slice", [BANK_INPUT, f"{p}/start", f"{p}/end"], [f"{p}/flat"]),
        helper.make_node("Reshape", [f"{p}/flat", f"{p}/shape"], [f"{p}/unit"]),
    ]
    if node.op_type == "RandomNormalLike":  # the bank holds standard normals
        scale, shift = float(attrs.get("scale", 1.0)), float(attrs.get("mean", 0.0))
        unit = f"{p}/unit"
    else:  # standard normal -> uniform(0, 1) through the normal CDF, then to [low, high)
        low, high = float(attrs.get("low", 0.0)), float(attrs.get("high", 1.0))
        scale, shift = high - low, low
        nodes += [
            _const(f"{p}/rsqrt2", 1 / math.sqrt(2)),
            helper.make_node("Mul", [f"{p}/unit", f"{p}/rsqrt2"], [f"{p}/scaled"]),
            helper.make_node("Erf", [f"{p}/scaled"], [f"{p}/erf"]),
            _const(f"{p}/half", 0.5),
            helper.make_node("Add", [f"{p}/erf", f"{p}/one"], [f"{p}/erf1"]),
            _const(f"{p}/one", 1.0),
            helper.make_node("Mul", [f"{p}/erf1", f"{p}/half"], [f"{p}/uniform"]),
        ]
        unit = f"{p}/uniform"
    nodes += [
        _const(f"{p}/scale", scale),
        _const(f"{p}/shift", shift),
        helper.make_node("Mul", [unit, f"{p}/scale"], [f"{p}/mul"]),
        helper.make_node("Add", [f"{p}/mul", f"{p}/shift"], [f"{p}/value"]),
        helper.make_node("Cast", [f"{p}/value"], [node.output[0]], to=int(attrs.get("dtype", TensorProto.FLOAT))),
    ]
    return _topological(nodes)


def _const(name: str, value: float) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.array(value, np.float32)))


def _topological(nodes: list[onnx.NodeProto]) -> list[onnx.NodeProto]:
    """Constants first: ONNX wants every value defined before it is used."""
    return [n for n in nodes if n.op_type == "Constant"] + [n for n in nodes if n.op_type != "Constant"]


def noise_bank(rng: np.random.Generator, nodes: int, stride: int) -> np.ndarray:
    """Standard normal values for every rewritten node, drawn from `rng`."""
    return rng.standard_normal(max(nodes, 1) * stride, dtype=np.float32)
