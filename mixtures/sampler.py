"""Which source gives the next document: token-fair queuing over whole documents.

The source with the smallest ``tokens_this_stage / weight`` among the sources with a positive
weight that are not dropped gives its next whole document; a tie goes to the source furthest below
its share (for equal ``tokens / weight`` that is the larger weight: at a stage start, the source the
stage asks most of, not the first one listed), then to the lowest index. This is weighted
fair queuing on tokens, a deterministic relative of smooth weighted round-robin that balances
*tokens* rather than documents (balancing documents would skew the token shares toward sources
with long documents): after any number of documents, every source's token count in the stage is
within one document (of that source) of ``weight_share * stage_tokens``. The state is one
integer per source, so it resumes exactly.
"""
from __future__ import annotations

from typing import Sequence


class TokenFairSampler:
    """Pick the source whose ``tokens / weight`` is smallest (ties: the larger deficit, i.e. the
    larger weight; then the lowest index).

    Guarantee (tested): among the active sources of a stage, ``t_i / w_i`` stay within one
    document of each other, so ``|t_i - share_i * T| <= max document length`` at every point.
    """

    def __init__(self, n: int):
        self.tokens = [0] * n          # tokens given by each source in the current stage

    def reset(self) -> None:
        self.tokens = [0] * len(self.tokens)

    def choose(self, weights: Sequence[float], active: Sequence[bool]) -> int:
        best, best_v, best_w = -1, 0.0, 0.0
        for i, (w, a) in enumerate(zip(weights, active)):
            if not a or w <= 0:
                continue
            v = self.tokens[i] / w
            if best < 0 or v < best_v or (v == best_v and w > best_w):
                best, best_v, best_w = i, v, w
        return best

    def add(self, i: int, n_tokens: int) -> None:
        self.tokens[i] += n_tokens
