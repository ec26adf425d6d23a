"""Which buffered samples make the next micro-batch (method §5: batches of whole images at
native aspect, packed into a token budget).

A random buffered sample seeds the micro-batch; samples of the same grid (bucket) are added in
random order while they fit, then the largest remaining ones that still fit, then swaps of
chosen samples for slightly longer buffered ones close what gap is left (`_close_gap`).
Same-bucket first keeps a micro-batch's samples alike (and their attention cost predictable);
largest-first and the swaps close the gap, which is what keeps real tokens / budget high when
only a few large images fit in a budget.
"""

from __future__ import annotations

import bisect

import numpy as np


def pick(lengths: list[int], grids: list[tuple[int, int]], budget: int,
         rng: np.random.Generator) -> tuple[list[int], int]:
    """(buffer positions of the chosen samples, their packed tokens: <= budget)."""
    seed = int(rng.integers(len(lengths)))
    chosen, used = [seed], lengths[seed]
    same = [i for i, g in enumerate(grids) if i != seed and g == grids[seed]]
    for i in rng.permutation(len(same)):
        j = same[int(i)]
        if used + lengths[j] <= budget:
            chosen.append(j)
            used += lengths[j]
    taken = set(chosen)
    # Largest first; ties broken by buffer position (deterministic).
    for i in sorted((i for i in range(len(lengths)) if i not in taken),
                    key=lambda i: (-lengths[i], i)):
        if used + lengths[i] <= budget:
            chosen.append(i)
            used += lengths[i]
    return chosen, _close_gap(lengths, budget, chosen, used)


def _close_gap(lengths: list[int], budget: int, chosen: list[int], used: int) -> int:
    """Swap chosen samples for slightly longer buffered ones while the budget allows.

    After the greedy fill the gap is shorter than any buffered sample, so nothing more fits;
    with only ~8-16 near-equal samples per budget (1024 px: 8 x ~4000 tokens in 32768) that
    gap averages half a sample, ~3% of the budget. Each pass makes the single swap that
    shrinks the gap most: the longest unchosen sample still fitting in place of a chosen one.
    Lengths differ by bucket (e.g. 3840 / 4032 / 4096 tokens) and caption, so a few swaps
    usually close the gap to a few tokens. Only the composition of this micro-batch changes:
    every sample is still batched exactly once, swapped-out ones simply stay buffered.
    Mutates `chosen` in place; returns the new token count."""
    taken = set(chosen)
    free = sorted((lengths[i], i) for i in range(len(lengths))
                  if i not in taken)  # (length, buffer index), ascending
    for _ in range(len(chosen)):
        gap = budget - used
        best = None  # (gain, position in chosen, position in free)
        for pos, i in enumerate(chosen):
            have = lengths[i]
            k = bisect.bisect_right(free, have + gap, key=lambda e: e[0]) - 1
            if k >= 0 and free[k][0] > have and (best is None or free[k][0] - have > best[0]):
                best = (free[k][0] - have, pos, k)
        if best is None:
            break
        gain, pos, k = best
        out, (_, into) = chosen[pos], free.pop(k)
        chosen[pos] = into
        bisect.insort(free, (lengths[out], out))
        used += gain
    return used
