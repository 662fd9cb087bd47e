"""The gradients at the recorded calls' outputs, handed over call by call as the backward
pass reaches them, so that each call's norms are taken (and its output gradient and inputs
let go) while the backward goes on: peak memory then holds one layer's output gradient at a
time instead of all of them.

A recorded output whose autograd node lies on the way to another recorded output is run by
the backward anyway: a pre-hook on that node sees its full output gradient just before it
runs. Only the remaining outputs (the earliest layers, usually one) are asked of
``autograd.grad``, whose gradients arrive at its end.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

import torch
from torch import Tensor

from .recording import Use

Ready = Callable[[Use, list[Tensor | None]], None]


def _nodes_above_recorded(loss: Tensor, recorded: set[int]) -> set[int]:
    """ids of the autograd nodes from which some recorded node can be reached (going
    towards the inputs), found in one walk of the graph."""
    above: set[int] = set()
    state: dict[int, bool] = {}  # False: entered, True: done
    stack = [(loss.grad_fn, False)]
    while stack:
        node, leaving = stack.pop()
        if node is None:
            continue
        key = id(node)
        if leaving:
            children = [n for n, _ in node.next_functions if n is not None]
            if any(id(c) in recorded or id(c) in above for c in children):
                above.add(key)
            state[key] = True
            continue
        if key in state:
            continue
        state[key] = False
        stack.append((node, True))
        stack.extend((n, False) for n, _ in node.next_functions if n is not None)
    return above


def stream_output_grads(loss: Tensor, uses: list[Use], ready: Ready) -> None:
    """Calls ``ready(use, grads)`` once per use, grads in the order of ``use.edges`` (None
    where an output does not reach the loss), as soon as all of that use's are known."""
    recorded = {id(e.node) for use in uses for e in use.edges}
    above = _nodes_above_recorded(loss, recorded)
    grads: list[dict[int, Tensor | None] | None] = [{} for _ in uses]
    at_node: dict[int, list[tuple[int, int, int]]] = defaultdict(list)
    nodes = {}
    captured = []  # (use, slot) whose gradient autograd.grad returns
    for u, use in enumerate(uses):
        for slot, edge in enumerate(use.edges):
            if id(edge.node) in above:
                at_node[id(edge.node)].append((u, slot, edge.output_nr))
                nodes[id(edge.node)] = edge.node
            else:
                captured.append((u, slot))
    failure: list[BaseException] = []

    def deliver(u: int, slot: int, grad: Tensor | None) -> None:
        grads[u][slot] = grad
        if len(grads[u]) == len(uses[u].edges) and not failure:
            use_grads = [grads[u].pop(s) for s in range(len(uses[u].edges))]
            grads[u] = None  # delivered: its gradients are let go once ready returns
            ready(uses[u], use_grads)

    def prehook(key: int):
        def hook(grad_outputs):
            try:
                with torch.enable_grad():  # rules run as they would outside the backward
                    for u, slot, output_nr in at_node[key]:
                        deliver(u, slot, grad_outputs[output_nr])
            except BaseException as e:  # raised again once the backward is over
                failure.append(e)

        return hook

    handles = [node.register_prehook(prehook(key)) for key, node in nodes.items()]
    try:
        edges = [uses[u].edges[slot] for u, slot in captured]
        returned = torch.autograd.grad(loss, edges, allow_unused=True) if edges else []
    finally:
        for handle in handles:
            handle.remove()
    if failure:
        raise failure[0]
    for (u, slot), grad in zip(captured, returned):
        deliver(u, slot, grad)
    for u, use in enumerate(uses):  # outputs whose node the backward never reached
        if grads[u] is not None:
            for slot in range(len(use.edges)):
                if grads[u] is not None and slot not in grads[u]:
                    deliver(u, slot, None)
