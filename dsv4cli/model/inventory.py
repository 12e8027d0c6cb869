"""What a built model holds: its (name, shape) parameter list and a folded module tree with counts."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

Shape = tuple[int, ...]


def param_inventory(model: torch.nn.Module) -> list[tuple[str, Shape]]:
    """[(state-dict name, shape)] of every parameter, in module order (tied weights once)."""
    return [(name, tuple(p.shape)) for name, p in model.named_parameters()]


@dataclass
class TreeNode:
    """One module in the folded tree; `repeat` > 1 when identical siblings (e.g. layers 0..N-1) were folded."""

    name: str
    type: str
    params: int  # parameters of one instance, including children
    repeat: int = 1
    children: list["TreeNode"] = field(default_factory=list)

    def signature(self) -> tuple:
        """What makes two siblings foldable: type, count and the children's signatures (cached)."""
        cached = self.__dict__.get("_signature")
        if cached is None:
            cached = (self.type, self.params, tuple((c.repeat, c.signature()) for c in self.children))
            self.__dict__["_signature"] = cached
        return cached

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "type": self.type,
            "params": self.params,
            "repeat": self.repeat,
            "children": [c.to_json() for c in self.children],
        }


def _own_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters(recurse=False))


def module_tree(module: torch.nn.Module, name: str = "model") -> TreeNode:
    """Module tree with parameter counts; runs of identical numbered siblings fold into `name.{a..b}` xN.

    Counts are summed bottom-up (one pass, a 300B-parameter MoE spec has ~35k modules); the root's
    count is de-duplicated, so tied weights count once."""
    node = _tree(module, name)
    node.params = sum(p.numel() for p in module.parameters())
    return node


def _tree(module: torch.nn.Module, name: str) -> TreeNode:
    node = TreeNode(name, type(module).__name__, _own_count(module), 1, [])
    signatures: list[tuple] = []
    for child_name, child_module in module.named_children():
        child = _tree(child_module, child_name)
        node.params += child.params
        sig = child.signature()
        last = node.children[-1] if node.children else None
        if (
            last is not None
            and re.fullmatch(r"\d+(\.\.\d+)?", last.name)
            and child.name.isdigit()
            and signatures[-1] == sig
        ):
            first = last.name.split("..")[0]
            last.name = f"{first}..{child.name}"
            last.repeat += 1
        else:
            node.children.append(child)
            signatures.append(sig)
    return node


def render_tree(node: TreeNode, indent: str = "") -> list[str]:
    """Text lines: `name (Type) params` with `xN` for folded repeats."""
    rep = f" x{node.repeat}" if node.repeat > 1 else ""
    lines = [f"{indent}{node.name} ({node.type}){rep}  {node.params:,}"]
    for c in node.children:
        lines += render_tree(c, indent + "  ")
    return lines
