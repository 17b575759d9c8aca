"""The progress log: one line per version, one per evaluation."""

from collections.abc import Sequence
from logging import INFO

import numpy as np
from flwr.common.logger import log

from afl_flwr.callbacks.base import Callback, RunView, Stop
from afl_flwr.history import CENTRAL, Evaluation, UpdateEvent


class ProgressLog(Callback):
    """Log each version (updates merged, their staleness, times) and evaluation."""

    def on_version(self, run: RunView, merged: Sequence[UpdateEvent]) -> Stop | None:
        """``[version v/N] merged k update(s), staleness ... | sim | wall``."""
        taus = [e.staleness for e in merged if e.staleness is not None]
        log(
            INFO,
            "[version %d/%d] merged %d update(s), staleness mean %.2f max %d | "
            "sim %.1fs | wall %.1fs",
            run.version,
            run.num_rounds,
            len(merged),
            float(np.mean(taus)) if taus else 0.0,
            max(taus, default=0),
            run.clock.now(),
            run.clock.wall(),
        )
        return None

    def on_evaluation(self, run: RunView, evaluation: Evaluation) -> Stop | None:
        """``[version v] metrics | updates | sim | wall`` (federated: its nodes)."""
        point = evaluation.point
        values = ", ".join(f"{k}={v:.4f}" for k, v in point.metrics.items())
        if evaluation.kind == CENTRAL:
            log(
                INFO,
                "[version %d] %s | updates %d | sim %.1fs | wall %.1fs",
                point.version,
                values,
                point.client_updates,
                point.sim_time,
                point.wall_time,
            )
        else:
            log(INFO, "[version %d] federated evaluation: %s", point.version, values)
        return None
