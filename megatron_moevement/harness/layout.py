"""Parallel layouts (TP/PP/DP/EP) for the local harness and their validation."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass


class LayoutError(ValueError):
    """A parallel layout that Megatron-Core cannot build."""


@dataclass(frozen=True)
class ParallelLayout:
    """How the ranks of a job are divided, in Megatron-Core's terms.

    Megatron carves expert parallelism out of data (and tensor) parallelism, so the world size is
    ``tp * pp * dp`` and ``ep`` must divide ``tp * dp``.
    """

    tp: int = 1
    """Tensor-parallel size."""

    pp: int = 1
    """Pipeline-parallel size (number of stages)."""

    dp: int = 1
    """Data-parallel size of the non-expert parameters."""

    ep: int = 1
    """Expert-parallel size (ranks the experts of a layer are spread over)."""

    etp: int | None = None
    """Expert tensor-parallel size (``None``: the same as ``tp``). Experts are spread over
    ``ep * etp`` ranks, which must divide ``tp * dp``."""

    def __post_init__(self) -> None:
        if self.etp is not None and (not isinstance(self.etp, int) or self.etp < 1):
            raise LayoutError(f"ParallelLayout.etp={self.etp!r} is invalid: use an int >= 1")
        for name in ("tp", "pp", "dp", "ep"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise LayoutError(f"ParallelLayout.{name}={value!r} is invalid: use an int >= 1")
        if (self.tp * self.dp) % self.ep != 0:
            raise LayoutError(
                f"ParallelLayout ep={self.ep} does not divide tp*dp={self.tp * self.dp}: "
                "Megatron-Core takes expert-parallel ranks out of the data-parallel ranks; "
                "choose ep so that it divides tp*dp"
            )
        if (self.tp * self.dp) % (self.ep * self.expert_tp) != 0:
            raise LayoutError(
                f"ParallelLayout ep={self.ep} x etp={self.expert_tp} does not divide "
                f"tp*dp={self.tp * self.dp}: Megatron-Core spreads each layer's experts over "
                "ep * etp of the tp * dp ranks of a stage; choose sizes that divide it"
            )

    @property
    def world_size(self) -> int:
        """Number of ranks the layout needs."""
        return self.tp * self.pp * self.dp

    @property
    def expert_tp(self) -> int:
        """Expert tensor-parallel size (``etp``, defaulting to ``tp``)."""
        return self.tp if self.etp is None else self.etp

    @property
    def expert_dp(self) -> int:
        """Data-parallel size of the expert parameters."""
        return self.tp * self.dp // (self.ep * self.expert_tp)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def parse(cls, text: str) -> "ParallelLayout":
        """Parses ``"pp2xdp2xep2"``-style strings (case-insensitive, any order, ``x`` separated).

        ``"1"`` or ``"single"`` is the one-rank layout.
        """
        text = text.strip().lower()
        if text in ("1", "single", ""):
            return cls()
        sizes = {}
        for part in re.split(r"[x*,\s]+", text):
            match = re.fullmatch(r"(tp|pp|dp|ep|etp)(\d+)", part)
            if not match:
                raise LayoutError(
                    f"cannot parse layout part {part!r} of {text!r}: write e.g. 'pp2xdp2xep2'"
                )
            sizes[match.group(1)] = int(match.group(2))
        if "dp" not in sizes and "ep" in sizes:
            sizes["dp"] = sizes["ep"]  # "ep2" alone means two data-parallel ranks holding experts
        return cls(**sizes)

    def __str__(self) -> str:
        etp = "" if self.etp is None else f"xetp{self.etp}"
        return f"tp{self.tp}xpp{self.pp}xdp{self.dp}xep{self.ep}{etp}"
