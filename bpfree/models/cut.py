"""Cutting a user's module into blocks and a head at named submodules, keeping its own forward code.

    graph  = torch.fx trace of model.forward; a submodule is a leaf (called whole) unless a cut
             point lies inside it, so the user's own classes (a BasicBlock, a layer) stay whole
    part k = the nodes after cut k-1 up to and including the call of split_at[k]; after the last
             cut, one more block up to the last node with weights before the head (if any), then the
             head: the rest of forward (pooling, flatten, the head module, whatever forward does)
    check  = the only value crossing a cut is the cut module's output (a skip connection that jumps
             a cut, a module called in two parts or a forward with other inputs is refused, named)
    build  = each part as its own module over the *same* submodules and parameters: an nn.Sequential
             when the part is a plain chain of module calls (so rules that read layers, e.g. LRA,
             and rules that copy units, e.g. AugLocal, see them), else a torch.fx GraphModule

This is torch.distributed.pipelining's `pipeline(module, split_spec=...)` idea (capture the graph,
cut it at module boundaries); fx rather than torch.export, because export functionalises the graph
and the parts must hold the user's parameters themselves, not copies.
"""
from __future__ import annotations

from typing import Optional, Sequence

from torch import fx, nn

from ..errors import BpfreeError, first_line


def cut_module(model: nn.Module, split_at: Sequence[str], head: str) -> tuple[list[nn.Module], nn.Module]:
    """(blocks, head) of `model` cut after each submodule in `split_at` (dotted names); `head` names the
    submodule that makes the class scores, and everything forward does after the last cut goes with it."""
    if not isinstance(model, nn.Module):
        raise BpfreeError(f"from_module needs an nn.Module, got {type(model).__name__}")
    if isinstance(split_at, str):
        split_at = [split_at]
    if not isinstance(split_at, (list, tuple)) or not split_at or not all(isinstance(n, str) for n in split_at):
        raise BpfreeError(f"split_at must be a non-empty list of submodule names, e.g. ['layer1', 'layer2'], "
                          f"got {split_at!r}")
    if not isinstance(head, str):
        raise BpfreeError(f"head must name the submodule that outputs class scores, e.g. 'fc', got {head!r}")
    names = dict(model.named_modules())
    children = ", ".join(n for n, _ in model.named_children()) or "none"
    for name in [*split_at, head]:
        if not name or name not in names:
            raise BpfreeError(f"{type(model).__name__} has no submodule {name!r}; its children: {children}")
    if len(set(split_at)) != len(split_at) or head in split_at:
        raise BpfreeError(f"split_at and head must name distinct submodules, got split_at={list(split_at)}, "
                          f"head={head!r}")
    graph = _trace(model, [*split_at, head])
    nodes = list(graph.nodes)
    position = {n: i for i, n in enumerate(nodes)}
    inputs = [n for n in nodes if n.op == "placeholder"]
    if len(inputs) != 1:
        raise BpfreeError(f"from_module cuts a forward(x) of one input; {type(model).__name__}.forward takes "
                          f"{', '.join(n.target for n in inputs)}")
    calls = {name: [n for n in nodes if n.op == "call_module" and n.target == name] for name in [*split_at, head]}
    for name, found in calls.items():
        if len(found) != 1:
            raise BpfreeError(f"{type(model).__name__}.forward calls {name!r} {len(found)} times; a cut point and "
                              "the head must be called exactly once")
    cuts = sorted((calls[name][0] for name in split_at), key=position.get)
    head_call = calls[head][0]
    if position[head_call] < position[cuts[-1]]:
        raise BpfreeError(f"the head {head!r} is called before the cut after {cuts[-1].target!r}; the head "
                          "comes after every cut")
    # The last block runs on to the last node with weights before the head; what follows it (pooling,
    # flatten, dropout: code without weights) goes with the head.
    weighted = [n for n in nodes[position[cuts[-1]] + 1:position[head_call]] if _has_weights(model, n)]
    if weighted:
        cuts.append(weighted[-1])
    part = {}                                  # node -> part index (0..K-1 blocks, K the head)
    k = 0
    for n in nodes:
        part[n] = k
        if k < len(cuts) and n is cuts[k]:
            k += 1
    _check_crossings(model, nodes, part, cuts)
    modules = [_build(model, graph, [n for n in nodes if part[n] == p and n.op not in ("placeholder", "output")],
                      inputs[0] if p == 0 else cuts[p - 1], cuts[p] if p < len(cuts) else None)
               for p in range(len(cuts) + 1)]
    _check_owners(model, modules, [c.target for c in cuts])
    return modules[:-1], modules[-1]


class _Tracer(fx.Tracer):
    """Calls a submodule whole unless a cut point or the head lies inside it."""

    def __init__(self, needed: list[str]):
        super().__init__()
        self.needed = needed

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return not any(name.startswith(qualname + ".") for name in self.needed)


def _trace(model: nn.Module, needed: list[str]) -> fx.Graph:
    try:
        return _Tracer(needed).trace(model)
    except Exception as e:            # fx raises many kinds (TraceError, TypeError on data-dependent control flow)
        raise BpfreeError(f"cannot capture {type(model).__name__}.forward as a graph with torch.fx "
                          f"({type(e).__name__}: {first_line(e)[:160]}); code that branches on tensor values "
                          "cannot be cut: move it inside a submodule that lies within one block") from None


def _has_weights(model: nn.Module, n: fx.Node) -> bool:
    """A call of a module with parameters or buffers, or an op reading an attribute (a parameter)."""
    if n.op == "call_module":
        module = model.get_submodule(n.target)
        return any(True for _ in module.parameters()) or any(True for _ in module.buffers())
    return any(a.op == "get_attr" for a in n.all_input_nodes)


def _describe(n: fx.Node) -> str:
    if n.op == "call_module":
        return f"the output of {n.target!r}"
    if n.op == "get_attr":
        return f"attribute {n.target!r}"
    return f"{n.name!r} (from {getattr(n.target, '__name__', n.target)})"


def _check_crossings(model: nn.Module, nodes: list, part: dict, cuts: list) -> None:
    """The only value a part reads from before it is the previous cut's output (attributes are free)."""
    for n in nodes:
        for used in n.all_input_nodes:
            if part[used] == part[n] or used.op == "get_attr" or (part[n] > 0 and used is cuts[part[n] - 1]):
                continue
            if used.op == "placeholder":
                what = f"the input x, read after the cut after {cuts[part[n] - 1].target!r}"
            else:
                what = f"{_describe(used)}, made before the cut after {cuts[part[used]].target!r}"
            user = n.target if n.op == "call_module" else "the output" if n.op == "output" else n.name
            raise BpfreeError(f"a value crosses a cut of {type(model).__name__}: {what}, is used by {user!r} "
                              "after it (a skip connection over the cut); cut at a module whose output is all "
                              "that the rest of forward needs")


def _build(model: nn.Module, graph: fx.Graph, body: list, source: fx.Node, out: Optional[fx.Node]) -> nn.Module:
    """One part over the model's own submodules: an nn.Sequential for a chain of module calls (the head:
    the module itself when it is one call), else a GraphModule running the part's nodes."""
    result = out if out is not None else next(n for n in graph.nodes if n.op == "output").args[0]
    if not isinstance(result, fx.Node):
        raise BpfreeError(f"{type(model).__name__}.forward returns {type(result).__name__}, not one tensor of "
                          "class scores: from_module needs forward(x) -> scores")
    chain, prev = bool(body), source
    for n in body:
        chain = chain and n.op == "call_module" and len(n.args) == 1 and n.args[0] is prev and not n.kwargs
        prev = n
    if chain and prev is result:
        layers = [model.get_submodule(n.target) for n in body]
        return layers[0] if out is None and len(layers) == 1 else nn.Sequential(*layers)
    part = fx.Graph()
    env = {source: part.placeholder("x")}

    def lookup(a: fx.Node) -> fx.Node:
        if a not in env:                     # an attribute fetched in another part: fetch it here too
            env[a] = part.node_copy(a)
        return env[a]
    for n in body:
        env[n] = part.node_copy(n, lookup)
    part.output(lookup(result))
    return fx.GraphModule(model, part, class_name=f"{type(model).__name__}Part")


def _check_owners(model: nn.Module, parts: list[nn.Module], cut_names: list[str]) -> None:
    """A parameter belongs to one part: each stage owns and updates its own."""
    owner = {}
    for p, part in enumerate(parts):
        for param in part.parameters():
            if id(param) in owner and owner[id(param)] != p:
                where = lambda i: f"block {i + 1}" if i < len(parts) - 1 else "the head"  # noqa: E731
                raise BpfreeError(f"a parameter of {type(model).__name__} is used in {where(owner[id(param)])} and "
                                  f"in {where(p)} (a module called on both sides of a cut); a stage must own its "
                                  "parameters alone")
            owner[id(param)] = p

