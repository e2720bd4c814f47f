"""How a query meets an item: dot product or cosine over a temperature, plus an optional
learned item bias; in training (the whole table at once) and in evaluation (``Scorer``: a range
of a domain's items at a time)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


class Scoring:
    """``temperature`` > 0: cos(query, item) / temperature (both L2-normalised); 0: the dot
    product. A bias column of the table (the item bias) meets a constant 1 in the query."""

    def __init__(self, temperature: float = 0.0):
        self.temperature = temperature

    def query(self, q: torch.Tensor, with_bias: bool) -> torch.Tensor:
        q = F.normalize(q, dim=-1) / self.temperature if self.temperature else q
        return torch.cat([q, q.new_ones(q.shape[:-1] + (1,))], -1) if with_bias else q

    def rows(self, rows: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """Item vectors as scored: normalised (cosine) and given their bias column."""
        if self.temperature:
            rows = F.normalize(rows, dim=-1)
        return rows if bias is None else torch.cat([rows, bias[:, None]], 1)

    def describe(self, with_bias: bool) -> str:
        s = f"cos(query, item) / {self.temperature:g}" if self.temperature else "dot(query, item)"
        return s + (" + a learned bias per item" if with_bias else "")


class Scorer:
    """Scores of a batch's queries ``[B, D']`` against the items of one domain (global ids
    ``lo .. hi - 1``), a range of them at a time: ``columns(a, b)`` is ``[B, b - a]`` for the
    domain's items ``a .. b - 1`` (0-based within the domain). Each range is normalised and given
    its bias column by itself, so memory stays ``B x (b - a)`` whatever the vocabulary, and a
    column's score is the same whichever range it is computed in."""

    def __init__(self, query: torch.Tensor, table: torch.Tensor, bias: torch.Tensor | None, lo: int, hi: int,
                 scoring: Scoring):
        self.query, self.table, self.bias, self.lo, self.scoring = query, table, bias, lo, scoring
        self.n_items = hi - lo

    def rows(self, a: int, b: int) -> torch.Tensor:
        """The scored item vectors of the domain's items ``a .. b - 1``: ``[b - a, D']``."""
        return self.scoring.rows(self.table[self.lo + a:self.lo + b],
                                 None if self.bias is None else self.bias[self.lo + a:self.lo + b])

    def rows_at(self, cols: torch.Tensor) -> torch.Tensor:
        """The scored item vectors of the domain's items ``cols`` (0-based): ``[len(cols), D']``."""
        return self.scoring.rows(self.table[self.lo + cols], None if self.bias is None else self.bias[self.lo + cols])

    def columns(self, a: int, b: int) -> torch.Tensor:
        return self.query @ self.rows(a, b).T

    def at(self, cols: torch.Tensor) -> torch.Tensor:
        """``[B]``: row r's score of the domain's item ``cols[r]``, as a ``[B, B]`` matrix product
        (the kind of product ``columns`` uses) of which the diagonal is kept."""
        return (self.query @ self.rows_at(cols).T).diagonal()
