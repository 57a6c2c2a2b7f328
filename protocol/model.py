"""Models as data: a torch module travels as a graph (JSON) and its weights (safetensors),
and is rebuilt at the node from an allow-list alone. Nothing is unpickled and no code the
sender wrote is executed: the node constructs allow-listed layer types with their
recorded arguments, and wires them up as the graph says, calling allow-listed functions.

    spec, state = describe_model(model)       # scientist side: trace with torch.fx
    rebuilt = build_model(spec, state)        # node side: same outputs, bit for bit

A layer type or a function outside the allow-lists is :class:`ForbiddenOperation` naming
it, on either side. Losses and optimizers are picked by name (:data:`LOSSES`,
:data:`OPTIMIZERS`), never sent as code.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from protocol.errors import ForbiddenOperation, InvalidRequest
from protocol.model_spec import MAX_NODES, GraphNode, LayerSpec, ModelSpec, NodeRef, Scalar

__all__ = ["MAX_NODES", "GraphNode", "LayerSpec", "ModelSpec", "NodeRef", "build_model", "describe_model",
           "flatten_state", "load_state", "unflatten_state"]

MAX_PARAMETERS = 16 * 1024 * 1024

# layer type → the constructor arguments we record and pass back (nothing else is read)
LAYERS: dict[str, tuple[type[nn.Module], tuple[str, ...]]] = {
    "Linear": (nn.Linear, ("in_features", "out_features", "bias")),
    "Conv2d": (nn.Conv2d, ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation",
                           "groups", "bias")),
    "MaxPool2d": (nn.MaxPool2d, ("kernel_size", "stride", "padding", "dilation", "ceil_mode")),
    "AvgPool2d": (nn.AvgPool2d, ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad")),
    "Flatten": (nn.Flatten, ("start_dim", "end_dim")),
    "Dropout": (nn.Dropout, ("p",)),
    "BatchNorm1d": (nn.BatchNorm1d, ("num_features", "eps", "momentum", "affine", "track_running_stats")),
    "BatchNorm2d": (nn.BatchNorm2d, ("num_features", "eps", "momentum", "affine", "track_running_stats")),
    "ReLU": (nn.ReLU, ()),
    "LeakyReLU": (nn.LeakyReLU, ("negative_slope",)),
    "Sigmoid": (nn.Sigmoid, ()),
    "Tanh": (nn.Tanh, ()),
    "Softmax": (nn.Softmax, ("dim",)),
    "LogSoftmax": (nn.LogSoftmax, ("dim",)),
}
_LAYER_NAMES = {cls: name for name, (cls, _) in LAYERS.items()}

# functions a traced forward may call (call_function), by the name they travel under
FUNCTIONS: dict[str, Callable[..., Any]] = {
    "torch.relu": torch.relu, "torch.sigmoid": torch.sigmoid, "torch.tanh": torch.tanh,
    "torch.flatten": torch.flatten, "torch.cat": torch.cat, "torch.add": torch.add, "torch.mul": torch.mul,
    "F.relu": F.relu, "F.leaky_relu": F.leaky_relu, "F.softmax": F.softmax, "F.log_softmax": F.log_softmax,
    "F.dropout": F.dropout, "F.max_pool2d": F.max_pool2d, "F.avg_pool2d": F.avg_pool2d,
    "add": operator.add, "sub": operator.sub, "mul": operator.mul, "truediv": operator.truediv,
    "getitem": operator.getitem, "getattr": getattr,
}
_FUNCTION_NAMES = {id(fn): name for name, fn in FUNCTIONS.items()}
METHODS = frozenset({"view", "reshape", "flatten", "relu", "sigmoid", "tanh", "size", "softmax", "log_softmax",
                     "unsqueeze", "squeeze", "permute", "transpose", "contiguous", "float", "mean", "sum"})
ATTRIBUTES = frozenset({"shape"})  # getattr(x, name) may read only these

LOSSES: dict[str, Callable[..., torch.Tensor]] = {"cross_entropy": F.cross_entropy, "mse": F.mse_loss}
OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam}

def describe_model(model: nn.Module) -> tuple[ModelSpec, dict[str, torch.Tensor]]:
    """Trace ``model`` and describe it; refuses what the node would refuse."""
    if type(model).__name__ in LAYERS and type(model) is LAYERS[type(model).__name__][0]:
        # a layer on its own traces as a call on its weights, not as a call of the layer
        raise InvalidRequest(f"send a model, not a bare layer: wrap it, e.g. torch.nn.Sequential({type(model).__name__}"
                             "(…)); its weights are then named '0.weight', '0.bias'")
    _allowed_layers(model)
    try:
        traced = torch.fx.symbolic_trace(model)
    except Exception as exc:  # value-dependent control flow and the like
        raise InvalidRequest(
            f"the model's forward cannot be traced ({type(exc).__name__}: {exc})"[:400] + ". A model travels as a "
            "torch.fx graph: its forward must call allow-listed layers and functions in a fixed order — no `if` or "
            "loop that depends on a tensor's values") from None
    layers = {}
    for name, module in traced.named_modules():
        if name and not list(module.children()):
            layers[name] = _layer_spec(name, module)
    graph = []
    for node in traced.graph.nodes:
        if node.op == "get_attr":
            raise ForbiddenOperation(f"the forward reads the attribute {node.target!r} directly; use layers")
        target = node.target if node.op in ("placeholder", "call_module", "call_method", "output") \
            else _function_name(node.target)
        graph.append(GraphNode(name=node.name, op=node.op, target=str(target),
                               args=[_arg(a) for a in node.args], kwargs={k: _arg(v) for k, v in node.kwargs.items()}))
    spec = ModelSpec(layers=layers, graph=graph)
    _check_graph(spec)
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    return spec, state


def build_model(spec: ModelSpec, state: dict[str, torch.Tensor] | None = None) -> torch.fx.GraphModule:
    """The model as ``spec`` describes it, from allow-listed parts only; with ``state``, its weights."""
    _check_graph(spec)
    root = nn.Module()
    for name, layer in spec.layers.items():
        cls, allowed = LAYERS.get(layer.type, (None, ()))
        if cls is None:
            raise ForbiddenOperation(f"layer type {layer.type!r} is not allowed")
        unknown = set(layer.kwargs) - set(allowed)
        if unknown:
            raise ForbiddenOperation(f"{layer.type} takes no argument {sorted(unknown)}")
        try:
            module = cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in layer.kwargs.items()})
        except (TypeError, ValueError, RuntimeError) as exc:
            raise InvalidRequest(f"layer {name!r}: {exc}") from None
        _attach(root, name, module)
    graph = torch.fx.Graph()
    made: dict[str, torch.fx.Node] = {}
    for node in spec.graph:
        args = tuple(_value(a, made) for a in node.args)
        kwargs = {k: _value(v, made) for k, v in node.kwargs.items()}
        if node.op == "placeholder":
            made[node.name] = graph.placeholder(node.target)
        elif node.op == "call_module":
            made[node.name] = graph.call_module(node.target, args, kwargs)
        elif node.op == "call_function":
            made[node.name] = graph.call_function(FUNCTIONS[node.target], args, kwargs)
        elif node.op == "call_method":
            made[node.name] = graph.call_method(node.target, args, kwargs)
        else:
            graph.output(args[0] if args else None)
    module = torch.fx.GraphModule(root, graph)
    if sum(p.numel() for p in module.parameters()) > MAX_PARAMETERS:
        raise InvalidRequest(f"the model has more than {MAX_PARAMETERS} parameters")
    if state is not None:
        load_state(module, state)
    return module


def load_state(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    expected = {k: (tuple(v.shape), v.dtype) for k, v in module.state_dict().items()}
    got = {k: (tuple(v.shape), v.dtype) for k, v in state.items()}
    if expected != got:
        missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
        wrong = sorted(k for k in set(expected) & set(got) if expected[k] != got[k])
        raise InvalidRequest(f"weights do not fit the model: missing {missing}, unexpected {extra}, "
                             f"wrong shape or dtype {wrong}")
    module.load_state_dict(state)


def parameter_count(state: dict[str, torch.Tensor]) -> int:
    return sum(math.prod(v.shape) for v in state.values())


def _allowed_layers(model: nn.Module) -> None:
    """Refuse, by name, a torch layer off the allow-list before tracing: torch.fx would trace
    into some of them (an LSTM, a GRU) and fail on their control flow with a TraceError
    that names neither the layer nor the fix."""
    tracer = torch.fx.Tracer()
    for name, module in model.named_modules():
        if not any(module.children()) and tracer.is_leaf_module(module, name) and type(module) not in _LAYER_NAMES:
            where = f"layer {name!r} is" if name else "the model is"
            raise ForbiddenOperation(f"{where} a {type(module).__name__}, which is not allowed; build the model from "
                                     f"{', '.join(sorted(LAYERS))} (in Sequentials or a custom forward)")


def _layer_spec(name: str, module: nn.Module) -> LayerSpec:
    type_name = _LAYER_NAMES.get(type(module))
    if type_name is None:
        raise ForbiddenOperation(f"layer {name!r} is a {type(module).__name__}, which is not allowed; allowed: "
                                 f"{', '.join(sorted(LAYERS))}")
    kwargs: dict[str, Scalar | list[int]] = {}
    for arg in LAYERS[type_name][1]:
        value = getattr(module, arg)
        if arg == "bias":
            value = module.bias is not None
        kwargs[arg] = list(value) if isinstance(value, tuple) else value
    return LayerSpec(type=type_name, kwargs=kwargs)


def _function_name(target: Any) -> str:
    name = _FUNCTION_NAMES.get(id(target))
    if name is None:
        label = getattr(target, "__qualname__", None) or repr(target)
        module = getattr(target, "__module__", "") or ""
        raise ForbiddenOperation(f"the forward calls {module + '.' if module else ''}{label}, which is not allowed")
    return name


def _arg(value: Any) -> Any:
    if isinstance(value, torch.fx.Node):
        return NodeRef(node=value.name)
    if isinstance(value, list | tuple):
        return [_arg(v) for v in value]
    if value is None or isinstance(value, int | float | bool | str):
        return value
    raise ForbiddenOperation(f"the forward passes a {type(value).__name__} constant, which cannot travel")


def _value(arg: Any, made: dict[str, torch.fx.Node]) -> Any:
    if isinstance(arg, NodeRef):
        return made[arg.node]
    if isinstance(arg, list):
        return tuple(_value(a, made) for a in arg)
    return arg


def _check_graph(spec: ModelSpec) -> None:
    """Every node names an allowed layer, function or method, and refers only to earlier nodes."""
    seen: set[str] = set()
    for node in spec.graph:
        if node.op == "call_module" and node.target not in spec.layers:
            raise ForbiddenOperation(f"the graph calls an undeclared layer {node.target!r}")
        if node.op == "call_function" and node.target not in FUNCTIONS:
            raise ForbiddenOperation(f"function {node.target!r} is not allowed")
        if node.op == "call_method" and node.target not in METHODS:
            raise ForbiddenOperation(f"method {node.target!r} is not allowed")
        if node.op == "call_function" and node.target == "getattr" and (
                len(node.args) != 2 or node.args[1] not in ATTRIBUTES):
            raise ForbiddenOperation(f"getattr may read only {sorted(ATTRIBUTES)}")
        for ref in _refs([*node.args, *node.kwargs.values()]):
            if ref not in seen:
                raise InvalidRequest(f"graph node {node.name!r} uses {ref!r} before it is defined")
        seen.add(node.name)
    if spec.graph[-1].op != "output" or sum(n.op == "output" for n in spec.graph) != 1:
        raise InvalidRequest("the graph must end with its one output")


def _refs(args: list[Any]) -> list[str]:
    out: list[str] = []
    for a in args:
        if isinstance(a, NodeRef):
            out.append(a.node)
        elif isinstance(a, list):
            out.extend(_refs(a))
    return out


def _attach(root: nn.Module, qualified: str, module: nn.Module) -> None:
    *parents, leaf = qualified.split(".")
    at = root
    for part in parents:
        if not hasattr(at, part):
            at.add_module(part, nn.Module())
        at = getattr(at, part)
    at.add_module(leaf, module)


def flat_dtype(state: dict[str, torch.Tensor]) -> torch.dtype:
    """The dtype weights travel in: float32 when every tensor is float32 (most models: half
    the bytes of float64, and exact), else float64 (exact for float32, float16 and for
    integer buffers such as BatchNorm's batch count below 2^53)."""
    return torch.float32 if all(v.dtype == torch.float32 for v in state.values()) else torch.float64


def flatten_state(state: dict[str, torch.Tensor]) -> torch.Tensor:
    """All weights and buffers in one vector of :func:`flat_dtype`, in the state's order: how
    weights travel and are kept at a node."""
    dtype = flat_dtype(state)
    if not state:
        return torch.zeros(0, dtype=dtype)
    return torch.cat([v.detach().reshape(-1).to(dtype) for v in state.values()])


def unflatten_state(flat: torch.Tensor, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`flatten_state`, shaped and typed as ``like``."""
    total = sum(v.numel() for v in like.values())
    if flat.dim() != 1 or flat.numel() != total:
        raise InvalidRequest(f"a weight vector of {flat.numel()} values does not fit a model of {total}")
    out, at = {}, 0
    for name, ref in like.items():
        out[name] = flat[at:at + ref.numel()].reshape(ref.shape).to(ref.dtype)
        at += ref.numel()
    return out
