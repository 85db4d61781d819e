"""Fusion by pattern: find ``relu(bn(y) + s)`` and ``relu(bn(cat(...)))`` in any module tree with ``torch.fx``.

The class swap in :mod:`perfkit.fused` knows perfkit's own blocks; a torchvision- or timm-style ResNet
writes the same epilogue as ``out = self.bn2(out); out += identity; out = self.relu(out)``. Each module's
own ``forward`` is traced with its children as leaves (so the graph is that module's code, nothing
inlined), and this pattern is rewritten into a :class:`~perfkit.fused.wrc.FusedResidualEpilogue` call:

* a ``call_module`` to an affine ``nn.BatchNorm2d``, whose output has no other user,
* optionally scaled by a Python number or a 0-dim tensor attribute (``alpha``; otherwise 1),
* added (``+``, ``+=``, ``torch.add``, ``.add``/``.add_``) to any other value, the shortcut (``beta = 1``),
  the sum having no other user,
* passed through ReLU (``torch.relu``, ``F.relu``, ``.relu()``/``.relu_()``, an ``nn.ReLU`` module).

and a DenseNet-style concat feeding BN-ReLU, ``relu(bn(torch.cat(features, 1)))`` (torchvision's
``_DenseLayer``), into a :class:`~perfkit.fused.dense.FusedBatchNormReLU` call on the concat (BN and ReLU
in one kernel; the concat itself stays, unlike the whole-block swap of perfkit's own ``DenseBlock``).

Anything else is left alone: ReLU6, a pre-activation block (no ReLU after the sum), a sum or BatchNorm
output read twice (fusing would drop a value someone else reads). A module that does not trace (data-
dependent control flow) keeps its own code; its children are still searched. The fused module holds the
very BatchNorm module (and alpha tensor) of the original, so parameters and buffers stay shared.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

_RELU_FUNCTIONS = (torch.relu, torch.relu_, F.relu)
_RELU_METHODS = ("relu", "relu_")
_ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)
_ADD_METHODS = ("add", "add_")
_MUL_FUNCTIONS = (operator.mul, operator.imul, torch.mul)
_CAT_FUNCTIONS = (torch.cat, torch.concat)


@dataclass(frozen=True)
class _Match:
    """One epilogue in a traced module: the nodes to replace and what the fused module needs."""

    relu: fx.Node
    bn_target: str
    y: fx.Node
    shortcut: fx.Node
    alpha: float | str
    """A Python number, or the qualified name of a 0-dim tensor attribute of the traced module."""


@dataclass(frozen=True)
class _ConcatMatch:
    """``relu(bn(cat(..., dim=1)))`` in a traced module."""

    relu: fx.Node
    bn_target: str
    concat: fx.Node


class _OwnCodeTracer(fx.Tracer):
    """Traces one module's own forward: every child module is a leaf (a ``call_module`` node)."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        """Every child is a leaf: only the traced module's own code is searched."""
        return True


def _is_relu(node: fx.Node, root: nn.Module) -> bool:
    if node.op == "call_function" and node.target in _RELU_FUNCTIONS:
        return len(node.args) == 1 and set(node.kwargs) <= {"inplace"}
    if node.op == "call_method" and node.target in _RELU_METHODS:
        return len(node.args) == 1
    if node.op == "call_module":
        return type(root.get_submodule(node.target)) is nn.ReLU
    return False


def _is_add(node: fx.Node) -> bool:
    plain = len(node.args) == 2 and not node.kwargs
    return plain and ((node.op == "call_function" and node.target in _ADD_FUNCTIONS)
                      or (node.op == "call_method" and node.target in _ADD_METHODS))


def _batch_norm(node: fx.Node, root: nn.Module) -> nn.BatchNorm2d | None:
    if node.op != "call_module":
        return None
    module = root.get_submodule(node.target)
    # Exactly BatchNorm2d: a subclass (SyncBatchNorm, a frozen variant) may compute something else.
    if type(module) is nn.BatchNorm2d and module.affine and len(node.args) == 1 and not node.kwargs:
        return module
    return None


def _scaled_bn(node: fx.Node, root: nn.Module) -> tuple[fx.Node, float | str] | None:
    """``(bn node, alpha)`` if ``node`` is a BatchNorm2d output, optionally times a number or 0-dim attribute."""
    if _batch_norm(node, root) is not None:
        return node, 1.0
    if node.op != "call_function" or node.target not in _MUL_FUNCTIONS or len(node.args) != 2 or node.kwargs:
        return None
    for bn_arg, scale in (node.args, node.args[::-1]):
        if not isinstance(bn_arg, fx.Node) or _batch_norm(bn_arg, root) is None or len(bn_arg.users) != 1:
            continue
        if isinstance(scale, (int, float)) and not isinstance(scale, bool):
            return bn_arg, float(scale)
        if isinstance(scale, fx.Node) and scale.op == "get_attr":
            value = _get_attr(root, scale.target)
            if isinstance(value, torch.Tensor) and value.dim() == 0 and value.is_floating_point():
                return bn_arg, scale.target
    return None


def _get_attr(root: nn.Module, target: str):
    owner, _, name = target.rpartition(".")
    return getattr(root.get_submodule(owner) if owner else root, name)


def _matches(graph: fx.Graph, root: nn.Module) -> list[_Match]:
    found = []
    for relu in graph.nodes:
        if not _is_relu(relu, root):
            continue
        add = relu.args[0]
        if not isinstance(add, fx.Node) or not _is_add(add) or len(add.users) != 1:
            continue
        for left, right in (add.args, add.args[::-1]):
            if not isinstance(left, fx.Node) or not isinstance(right, fx.Node) or len(left.users) != 1:
                continue
            scaled = _scaled_bn(left, root)
            if scaled is None:
                continue
            bn_node, alpha = scaled
            if len(bn_node.users) != 1 or not isinstance(bn_node.args[0], fx.Node):
                continue
            found.append(_Match(relu, bn_node.target, bn_node.args[0], right, alpha))
            break
    return found


def _is_channel_concat(node: fx.Node) -> bool:
    if node.op != "call_function" or node.target not in _CAT_FUNCTIONS:
        return False
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    return dim in (1, -3)


def _concat_matches(graph: fx.Graph, root: nn.Module) -> list[_ConcatMatch]:
    found = []
    for relu in graph.nodes:
        if not _is_relu(relu, root):
            continue
        bn_node = relu.args[0]
        if not isinstance(bn_node, fx.Node) or _batch_norm(bn_node, root) is None or len(bn_node.users) != 1:
            continue
        concat = bn_node.args[0]
        if isinstance(concat, fx.Node) and _is_channel_concat(concat):
            found.append(_ConcatMatch(relu, bn_node.target, concat))
    return found


def _trace(module: nn.Module) -> fx.Graph | None:
    try:
        return _OwnCodeTracer().trace(module)
    except Exception:  # noqa: BLE001 - any module that does not trace keeps its own code
        return None


def _own_matches(module: nn.Module) -> tuple[fx.Graph | None, list[_Match | _ConcatMatch]]:
    graph = _trace(module)
    return graph, ([] if graph is None else [*_matches(graph, module), *_concat_matches(graph, module)])


def _skip(module: nn.Module) -> bool:
    """Modules not searched: already fused ones (nothing left to fuse, kernels not traceable) and torch.nn's
    own leaves (a Conv2d's or a BatchNorm's forward holds no epilogue; tracing them would only cost time)."""
    from perfkit.fused.dense import FusedBatchNormReLU, FusedDenseBlock
    from perfkit.fused.wrc import FusedResidualEpilogue

    if isinstance(module, (FusedResidualEpilogue, FusedDenseBlock, FusedBatchNormReLU)):
        return True
    return type(module).__module__.startswith("torch.nn.modules") and next(module.children(), None) is None


def find_patterns(model: nn.Module) -> list[str]:
    """Qualified names of the BatchNorms whose epilogue or concat-BN-ReLU :func:`fuse_patterns` would fuse."""
    names = []

    def visit(module: nn.Module, prefix: str) -> None:
        if _skip(module):
            return
        for name, child in module.named_children():
            visit(child, f"{prefix}{name}.")
        _, matches = _own_matches(module)
        names.extend(prefix + match.bn_target for match in matches)

    visit(model, "")
    return names


def _rewrite(module: nn.Module, graph: fx.Graph, matches: list[_Match | _ConcatMatch]) -> fx.GraphModule:
    from perfkit.fused.dense import FusedBatchNormReLU
    from perfkit.fused.wrc import FusedResidualEpilogue

    gm = fx.GraphModule(module, graph, class_name=f"Fused{type(module).__name__}")
    for index, match in enumerate(matches):
        bn = gm.get_submodule(match.bn_target)
        if isinstance(match, _ConcatMatch):
            name = f"fused_bn_relu_{index}"
            gm.add_submodule(name, FusedBatchNormReLU(bn))
            with gm.graph.inserting_before(match.relu):
                fused = gm.graph.call_module(name, (match.concat,))
            match.relu.replace_all_uses_with(fused)
            continue
        if isinstance(match.alpha, str):
            alpha = _get_attr(module, match.alpha)
        else:
            alpha = torch.tensor(match.alpha, dtype=bn.weight.dtype, device=bn.weight.device)
        beta = torch.tensor(1.0, dtype=bn.weight.dtype, device=bn.weight.device)
        name = f"fused_epilogue_{index}"
        gm.add_submodule(name, FusedResidualEpilogue(bn, alpha, beta))
        with gm.graph.inserting_before(match.relu):
            fused = gm.graph.call_module(name, (match.y, match.shortcut))
        match.relu.replace_all_uses_with(fused)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    gm.training = module.training
    return gm


def fuse_patterns(model: nn.Module) -> tuple[nn.Module, int]:
    """``(model, count)``: every epilogue and concat-BN-ReLU in ``model`` fused; modules rewritten in place.

    A module whose own code holds a match is replaced (in its parent, or returned if it is ``model``) by a
    ``torch.fx.GraphModule`` of that code calling the fused modules; other modules are untouched.
    """
    count = 0

    def visit(module: nn.Module) -> nn.Module:
        nonlocal count
        if _skip(module):
            return module
        for name, child in list(module.named_children()):
            replacement = visit(child)
            if replacement is not child:
                setattr(module, name, replacement)
        graph, matches = _own_matches(module)
        if not matches:
            return module
        count += len(matches)
        return _rewrite(module, graph, matches)

    return visit(model), count
