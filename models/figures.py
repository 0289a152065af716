"""Which stored evaluation figures describe a running server: by precision and TTA mode.

A checkpoint stores what `training.evaluate` measured on val (`models/checkpoint.py` has the
format and writes it): one main block, other TTA modes under "tta_alternatives" and other
precisions under "precision_alternatives". A server runs one precision and answers in a TTA
mode; the figures it reports are those measured that way where they are stored, else the main
ones, whose "precision" and "tta" say what they describe.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from models.errors import NotMeasuredError
from models.tta import TTA_MODES, TtaMode, check_tta


@dataclass(frozen=True)
class StoredFigures:
    """A checkpoint's stored metrics, read by precision and TTA mode."""

    metrics: dict[str, Any]

    @property
    def measured_tta(self) -> TtaMode:
        """The TTA mode the main stored metrics were measured with: the one to serve by default."""
        return check_tta(str(self.metrics.get("tta", "none")))

    def measured_precisions(self) -> tuple[str, ...]:
        """The precisions whose figures are stored, the main one first; () before evaluation."""
        if "accuracy" not in self.metrics:
            return ()
        main = str(self.metrics.get("precision", "fp32"))
        return (main, *(p for p in self.metrics.get("precision_alternatives", {}) if p != main))

    def _block(self, precision: str | None) -> dict[str, Any] | None:
        """The stored figures of one precision (None: the main one), with its TTA alternatives."""
        measured = self.measured_precisions()
        if not measured:
            return None
        if precision is None or precision == measured[0]:
            return self.metrics
        block: dict[str, Any] | None = self.metrics.get("precision_alternatives", {}).get(precision)
        return block

    def measured_tta_modes(self, precision: str | None = None) -> tuple[TtaMode, ...]:
        """The TTA modes whose figures are stored for `precision` (None: the main one), main mode first."""
        block = self._block(precision)
        if block is None:
            return ()
        main = check_tta(str(block.get("tta", "none")))
        others = [mode for mode in TTA_MODES if mode != main and mode in block.get("tta_alternatives", {})]
        return (main, *others)

    def metrics_for(self, tta: TtaMode, precision: str | None = None) -> dict[str, Any] | None:
        """The figures that describe serving with `tta` in `precision` (None: the main one); None if never measured."""
        block = self._block(precision)
        if block is None or tta not in self.measured_tta_modes(precision):
            return None
        figures = {
            key: value for key, value in block.items() if key not in ("tta_alternatives", "precision_alternatives")
        }
        if tta != block.get("tta", "none"):
            figures.update(block["tta_alternatives"][tta])
        return figures

    def reported_precision(self, served: str) -> str | None:
        """The precision whose figures describe a server running in `served`: itself where stored, else None (the main)."""
        return served if served in self.measured_precisions() else None

    def served(self, served_precision: str, served_tta: TtaMode, asked: TtaMode | None = None) -> dict[str, Any]:
        """The figures a server in `served_precision` reports for a request asking for `asked` (None: no mode).

        Measured in the served precision where stored, else the main ones (their "precision" says
        which). With no mode asked: the served mode's figures where stored, else the main ones
        (their "tta" says which mode they describe), else {} for a checkpoint never evaluated.

        Raises:
            NotMeasuredError: `asked` has no stored figures.
        """
        precision = self.reported_precision(served_precision)
        modes = self.measured_tta_modes(precision)
        if asked is None:
            served = self.metrics_for(served_tta, precision)
            main = self.metrics_for(modes[0], precision) if modes else None
            return served if served is not None else main or {}
        figures = self.metrics_for(asked, precision)
        if figures is None:
            measured = ", ".join(modes) or "nothing yet"
            raise NotMeasuredError(
                f"this checkpoint stores no figures measured with tta={asked}; it has them for: {measured} "
                f"(training.evaluate --also-tta {asked} --write-metrics adds them)"
            )
        return figures
