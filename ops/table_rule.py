"""The update rules of a row-sparse value table, and the one descriptor every backend reads.

As FBGEMM's table-batched embeddings pass one ``OptimizerArgs`` to every optimizer kernel, a
:class:`TableRule` names the rule and carries its hyperparameters; ``memlayer::update_rows``
takes it packed as ``int rule, float[] hyperparameters`` (:meth:`TableRule.packed`), and the
C++ kernel (``ops/csrc/row_sparse_cpu.cpp``) and the Triton launcher
(``ops/row_sparse_triton.py``) unpack it by the positions of :class:`Hyper`.

The rules (``w`` a touched row, ``g`` its gradient, times ``grad_scale``):

- ``sgd`` (no state): ``w -= lr * (g + weight_decay * w)``.
- ``rowwise_adagrad`` (state ``sum [N]``), FBGEMM's row-wise AdaGrad with L2 decay:
  ``g' = g + weight_decay * w``; ``sum += mean(g'²)``; ``m = lr / (sqrt(sum) + eps)``;
  ``w = (1 - m * weight_decay) * w - m * g``.
- ``adam`` (state ``exp_avg, exp_avg_sq [N, D]``): ``torch.optim.AdamW``'s update of the row at
  global step ``step`` (its bias corrections), with decoupled decay.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass


class Rule(enum.IntEnum):
    """An update rule; its value is the code the kernels switch on (``RULE`` in Triton, ``enum
    class Rule`` in C++)."""

    SGD = 0
    ROWWISE_ADAGRAD = 1
    ADAM = 2

    @classmethod
    def of(cls, name: str | Rule) -> Rule:
        """The rule called ``name`` (``"sgd"``, ``"rowwise_adagrad"``, ``"adam"``)."""
        if isinstance(name, Rule):
            return name
        if name not in RULES:
            raise ValueError(f"rule must be one of {', '.join(RULES)}, got {name!r}")
        return cls[name.upper()]

    @property
    def state_names(self) -> tuple[str, ...]:
        """The optimizer state it keeps per table, in the order the kernels take it."""
        return _STATE_NAMES[self]

    @property
    def default_eps(self) -> float:
        """``eps`` when none is given (FBGEMM's for row-wise AdaGrad, torch's for Adam)."""
        return _DEFAULT_EPS[self]


#: The rules by name, as optimizers and command lines spell them.
RULES = tuple(rule.name.lower() for rule in Rule)

_STATE_NAMES = {Rule.SGD: (), Rule.ROWWISE_ADAGRAD: ("sum",), Rule.ADAM: ("exp_avg", "exp_avg_sq")}
_DEFAULT_EPS = {Rule.SGD: 0.0, Rule.ROWWISE_ADAGRAD: 1e-10, Rule.ADAM: 1e-8}


class Hyper(enum.IntEnum):
    """Positions in the packed hyperparameters (``hyperparameters[Hyper.LR]``); the C++ kernel's
    ``enum Hyper`` repeats them."""

    LR = 0
    EPS = 1
    BETA1 = 2
    BETA2 = 3
    WEIGHT_DECAY = 4
    BIAS_CORRECTION1 = 5  # 1 - beta1 ** step
    BIAS_CORRECTION2_SQRT = 6  # sqrt(1 - beta2 ** step)


@dataclass(frozen=True)
class TableRule:
    """One step's rule and hyperparameters (``rule`` may be given by name). ``betas`` only
    matter to ``adam``; ``step`` is the steps taken, this one included (Adam's bias
    corrections)."""

    rule: Rule
    lr: float
    eps: float | None = None  # the rule's default_eps
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    step: int = 1

    def __post_init__(self) -> None:
        try:
            rule = Rule.of(self.rule)
        except ValueError as error:
            raise ValueError(f"TableRule: {error}") from None
        object.__setattr__(self, "rule", rule)
        if self.eps is None:
            object.__setattr__(self, "eps", rule.default_eps)
        object.__setattr__(self, "betas", tuple(self.betas))
        problem = _hyperparameter_problem(self.lr, self.eps, self.betas, self.weight_decay)
        if problem is None and not (isinstance(self.step, int) and self.step >= 1):
            problem = f"step must be an int >= 1 (the steps taken, this one too), got {self.step!r}"
        if problem:
            raise ValueError(f"TableRule: {problem}")

    def packed(self) -> tuple[int, list[float]]:
        """``(rule code, hyperparameters)`` as ``memlayer::update_rows`` takes them (positions
        in :class:`Hyper`); the bias corrections are computed here, in float64, as
        ``torch.optim.AdamW`` computes them."""
        beta1, beta2 = self.betas
        hyperparameters = [0.0] * len(Hyper)
        hyperparameters[Hyper.LR] = float(self.lr)
        hyperparameters[Hyper.EPS] = float(self.eps)
        hyperparameters[Hyper.BETA1] = float(beta1)
        hyperparameters[Hyper.BETA2] = float(beta2)
        hyperparameters[Hyper.WEIGHT_DECAY] = float(self.weight_decay)
        hyperparameters[Hyper.BIAS_CORRECTION1] = 1.0 - beta1**self.step
        hyperparameters[Hyper.BIAS_CORRECTION2_SQRT] = math.sqrt(1.0 - beta2**self.step)
        return int(self.rule), hyperparameters


def check_packed(op: str, rule: int, hyperparameters: list[float]) -> None:
    """What an op given a packed rule checks: a known code, and each hyperparameter in its
    range (NaN fails every test: ``not 0 <= nan`` holds)."""
    codes = [int(r) for r in Rule]
    if rule not in codes:
        raise ValueError(f"{op}: rule must be a Rule code {codes} ({', '.join(RULES)}), got {rule}")
    if len(hyperparameters) != len(Hyper):
        names = ", ".join(h.name.lower() for h in Hyper)
        raise ValueError(
            f"{op}: hyperparameters must be the {len(Hyper)} numbers [{names}] "
            f"(TableRule.packed), got {len(hyperparameters)}"
        )
    h = hyperparameters
    problem = _hyperparameter_problem(
        h[Hyper.LR], h[Hyper.EPS], (h[Hyper.BETA1], h[Hyper.BETA2]), h[Hyper.WEIGHT_DECAY]
    )
    for index in (Hyper.BIAS_CORRECTION1, Hyper.BIAS_CORRECTION2_SQRT):
        if problem is None and not 0 < h[index] <= 1:
            problem = f"{index.name.lower()} must lie in (0, 1], got {h[index]}"
    if problem:
        raise ValueError(f"{op}: {problem}")


def _hyperparameter_problem(
    lr: float, eps: float, betas: tuple[float, ...], weight_decay: float
) -> str | None:
    """What is wrong with the hyperparameters, or ``None``."""
    if not 0 <= lr < math.inf:  # 0 is allowed: LR schedules may decay to it, as torch.optim's
        return f"lr must be a finite number >= 0, got {lr}"
    if not 0 <= eps < math.inf:
        return f"eps must be a finite number >= 0, got {eps}"
    if len(betas) != 2:
        return f"betas must be two numbers, got {betas!r}"
    for name, beta in zip(("beta1", "beta2"), betas):
        if not 0 <= beta < 1:
            return f"{name} must lie in [0, 1), got {beta}"
    if not 0 <= weight_decay < math.inf:
        return f"weight_decay must be a finite number >= 0, got {weight_decay}"
    return None
