"""The reduction tree: partial sums added in a fixed shape over chunk indices.

Consecutive groups of ``fan_in`` leaves are added level by level, so the same leaves give
bitwise the same total whichever worker computed which leaf, with any number of workers and
after any recomputation. :func:`tree_sum` builds the tree as graph keys; the sequential and
streaming forms add the same tree in one process.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sae import objective as obj

DEFAULT_FAN_IN = 8


def _sum(*parts: obj.Sums) -> obj.Sums:
    """Add partial sums left to right (a fixed order)."""
    total = parts[0]
    for p in parts[1:]:
        total = obj.add_sums(total, p)
    return total


def tree_levels(n: int, fan_in: int = DEFAULT_FAN_IN) -> list[list[tuple[int, int]]]:
    """The fixed shape of the reduction tree over ``n`` leaves.

    Consecutive groups of ``fan_in`` nodes are added level by level until at most ``fan_in``
    nodes remain; those are added by the root. The shape depends only on ``n`` and
    ``fan_in``.

    Returns
    -------
    levels : list of list of (start, stop)
        For each inner level, the ranges of the previous level's nodes each node adds (a
        range of one node is passed through unchanged).
    """
    if fan_in < 2:
        raise ValueError(f"fan_in: must be >= 2, got {fan_in}")
    levels = []
    width = n
    while width > fan_in:
        groups = [(j, min(j + fan_in, width)) for j in range(0, width, fan_in)]
        levels.append(groups)
        width = len(groups)
    return levels


def tree_sum(
    dsk: dict, leaves: Sequence[Any], prefix: str, fan_in: int = DEFAULT_FAN_IN
) -> list[Any]:
    """Add the inner levels of the fixed-shape tree over ``leaves`` to ``dsk``.

    Returns
    -------
    keys : list
        At most ``fan_in`` keys whose sum, in order, is the total (the root's inputs).
    """
    level = list(leaves)
    for depth, groups in enumerate(tree_levels(len(leaves), fan_in)):
        nxt = []
        for j, (a, b) in enumerate(groups):
            if b - a == 1:
                nxt.append(level[a])
                continue
            key = (prefix, depth, j)
            dsk[key] = (_sum, *level[a:b])
            nxt.append(key)
        level = nxt
    return level


def sequential_tree_sum(parts: Sequence[obj.Sums], fan_in: int = DEFAULT_FAN_IN) -> obj.Sums:
    """The same fixed-shape tree as :func:`tree_sum` plus its root, in one process."""
    level = list(parts)
    for groups in tree_levels(len(level), fan_in):
        level = [level[a] if b - a == 1 else _sum(*level[a:b]) for a, b in groups]
    return _sum(*level)


def streaming_tree_sum(parts, n: int, fan_in: int = DEFAULT_FAN_IN) -> obj.Sums:
    """:func:`sequential_tree_sum` over an iterable of ``n`` sums, reduced while streaming.

    Each node of the fixed-shape tree is added as soon as its last input arrives, so at
    most ``fan_in`` sums per level (O(fan_in x depth)) are alive at once, whatever ``n``;
    the additions are the same, in the same order (bitwise the same total).

    Parameters
    ----------
    parts : iterable of Sums
        The leaves, in chunk order (a generator is consumed one item at a time).
    n : int
        Number of leaves (the shape of the tree depends on it).
    fan_in : int

    Raises
    ------
    ValueError
        If ``parts`` does not yield exactly ``n`` items.
    """
    levels = tree_levels(n, fan_in)
    depth = len(levels)
    bufs: list[list[obj.Sums]] = [[] for _ in range(depth + 1)]
    pos = [0] * depth  # index of the group being filled at each level

    def push(item: obj.Sums) -> None:
        d = 0
        while d < depth:
            a, b = levels[d][pos[d]]
            bufs[d].append(item)
            if len(bufs[d]) < b - a:
                return
            grp, bufs[d] = bufs[d], []
            pos[d] += 1
            item = grp[0] if len(grp) == 1 else _sum(*grp)
            del grp
            d += 1
        bufs[depth].append(item)

    count = 0
    for p in parts:
        count += 1
        if count > n:
            raise ValueError(f"parts: expected {n} sums, got more")
        push(p)
        del p
    if count != n:
        raise ValueError(f"parts: expected {n} sums, got {count}")
    return _sum(*bufs[depth])
