"""FASP-plus: FASP's column score and cut, with restoration and widths beyond the paper (`fasp` stays the paper's).

Each ingredient is an option, so a comparison can ablate it (`fasp-plus:widths=uniform`). The defaults are the
ingredients that helped on calibration-side data (c4-calval, SmolLM2 at 20% and 30%, 64 x 512 calibration; the
README's FASP-plus section has the table): adaptive widths, the intercept and held-out damping. The dense target
did not help there and is off by default. On Gemma-3-270M adaptive widths hurt, on c4-calval too: use
`widths=uniform` there (README).
- target: "pruned" is the paper's target; "dense" refits each consumer onto the dense model's output on the
  same tokens, which also corrects the error earlier blocks carried in (`pruning.restoration`).
- intercept: fit the consumer's bias jointly (a constant input column); it absorbs inputs that were constant,
  as FLAP's bias compensation does, inside the least-squares fit.
- damping: "auto" picks it per consumer from `restoration.DAMPING_GRID` by reconstruction error on held-out
  calibration windows (2 folds; no evaluation text is read); a number fixes it as in `fasp`.
- widths: "adaptive" allocates the removals across layers and between attention and FFN by one global
  threshold on each unit's output energy relative to the residual stream, token by token,
  sum_t x_tj^2 ||W_:j||^2 / ||h_t||^2 (h_t: the block's input; the error of removing the unit alone, unrestored,
  as a fraction of the stream it is added to), per parameter removed. Per token, because a few tokens carry
  massive residual norms deeper in the model: normalizing by the total energy instead emptied SmolLM2's
  middle layers. Where a norm sits between the consumer and the residual add (Gemma-3's post-attention and
  post-FFN norms; the family adapter says where), each token also counts that norm's gain
  ||norm(y_t)||^2 / ||y_t||^2 on the consumer's output y_t: the norm, not W, sets what reaches the stream
  (on Gemma-3-270M its mean over 512 calibration tokens runs from 0.4 to 2e9 across layers; without it the
  plan emptied the last five FFNs).
  "uniform" removes the same fraction everywhere, as `fasp` does. "search" chooses every layer's FFN and V width
  by evolutionary search against the dense model's next-token distribution on calibration windows
  (`pruning.width_search`), starting from the better of the adaptive and uniform widths; generations, offspring
  and selection_tokens (tokens per selection step, ascending, '/'-separated) set its budget.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import restoration
from ..arch import Coupling
from ..calibrate import InputStats
from ..errors import PruningError
from . import register
from .fasp import FASP

WIDTHS = {"adaptive": "global", "uniform": "uniform", "search": "search"}


@register
class FASPPlus(FASP):
    name = "fasp-plus"

    def __init__(self, target: str = "pruned", intercept: bool = True, damping: str = "auto",
                 damping_toward: str = "original", widths: str = "adaptive", generations: int = 16,
                 offspring: int = 8, selection_tokens: str = "1024/4096"):
        restoration.check_options(target=target)
        if widths not in WIDTHS:
            raise PruningError(f"unknown widths {widths!r}: choose {', '.join(WIDTHS)}")
        if isinstance(generations, bool) or not isinstance(generations, int) or generations < 0:
            raise PruningError(f"generations {generations!r} must be a whole number >= 0")
        if isinstance(offspring, bool) or not isinstance(offspring, int) or offspring < 1:
            raise PruningError(f"offspring {offspring!r} must be a whole number >= 1")
        try:
            tokens = tuple(int(t) for t in str(selection_tokens).split("/"))
        except ValueError:
            tokens = ()
        if not tokens or min(tokens) < 1 or list(tokens) != sorted(tokens):
            raise PruningError(f"selection_tokens {selection_tokens!r} must be ascending token counts, "
                               "one per selection step, separated by '/', e.g. 1024/4096")
        if damping != "auto":
            try:
                damping = float(damping)
            except ValueError:
                raise PruningError(f"damping {damping!r} is 'auto' or a number >= 0") from None
        super().__init__(restore=True, damping=0.0 if damping == "auto" else damping, damping_toward=damping_toward)
        self.damping = damping
        self.target = target
        self.intercept = intercept
        self.widths = widths
        self.generations, self.offspring, self.selection_tokens = generations, offspring, tokens
        self.allocation = WIDTHS[widths]
        self.needs_dense_inputs = target == "dense"
        self.folds = 2 if damping == "auto" else 1
        self.relative_allocation = True
        self.chosen_damping: dict[str, float] = {}

    def restore(self, consumer: nn.Linear, stats: InputStats, keep_columns: torch.Tensor, where: str = ""):
        damping = self.damping
        if damping == "auto" and not len(keep_columns):  # every column cut: no weight left to damp
            damping = 0.0
        elif damping == "auto" and where in self.chosen_damping:  # cut again (the width search's levels)
            damping = self.chosen_damping[where]
        elif damping == "auto":
            damping = restoration.choose_damping(consumer.weight, consumer.bias, stats, keep_columns, self.target,
                                                 self.intercept, self.damping_toward)
            self.chosen_damping[where] = damping
        return restoration.restore(consumer.weight, consumer.bias, stats, keep_columns, damping,
                                   self.damping_toward, self.target, self.intercept)

    def allocation_scores(self, coupling: Coupling, unit_scores: torch.Tensor, consumer: nn.Linear,
                          stats: InputStats, unit_cost: int) -> torch.Tensor:
        column_energy = stats.relative_sq_sum * consumer.weight.double().square().sum(0)
        return column_energy[coupling.columns].sum(-1) / unit_cost

    def describe(self) -> dict:
        search = ({"generations": self.generations, "offspring": self.offspring,
                   "selection_tokens": "/".join(map(str, self.selection_tokens))} if self.widths == "search" else {})
        return {"target": self.target, "intercept": self.intercept, "damping": self.damping,
                "damping_toward": self.damping_toward, "widths": self.widths, **search}

    def decisions(self) -> dict:
        return {"damping": dict(self.chosen_damping)} if self.chosen_damping else {}
