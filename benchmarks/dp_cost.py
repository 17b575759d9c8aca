"""The cost of user-level DP per merge: clipping and noise against the merge itself.

Times one buffered merge of K client updates of a real model (the app's
small CNN and ResNet-20), FedBuff against its DP release (``DPFedBuff``: clip
every delta to C, add Gaussian noise), on the same updates, alternating, with
the median of ``--repeats`` runs each. The ratio is measured in the same run.

    python benchmarks/dp_cost.py
"""

import argparse
import statistics
import time

import numpy as np
import torch
from flwr.app import ArrayRecord

from afl_flwr.aggregators import FedBuff, Update
from afl_flwr.experiments.runs import markdown_table
from afl_flwr.models import get_model
from afl_flwr.privacy import DPFedBuff
from afl_flwr.replies import arrayrecord_to_params


def _updates(model: str, k: int, seed: int = 0) -> tuple[dict, list[Update]]:
    torch.manual_seed(seed)
    params = arrayrecord_to_params(
        ArrayRecord(get_model(model, 1, 10).state_dict()), writable=True
    )
    rng = np.random.default_rng(seed)
    updates = []
    for client in range(k):
        moved = {
            n: (x + rng.normal(0, 0.01, x.shape)).astype(x.dtype)
            if x.dtype.kind == "f"
            else x.copy()
            for n, x in params.items()
        }
        updates.append(Update(client, moved, params, 0, client % 3, 100.0))
    return params, updates


def _time(rule, params, updates, repeats: int) -> list[float]:
    seconds = []
    for _ in range(repeats):
        for update in updates:
            rule.add(update)
        started = time.perf_counter()
        rule.merge(params)
        seconds.append(time.perf_counter() - started)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--buffer-size", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    if args.buffer_size < 1 or args.repeats < 1:
        parser.error("--buffer-size and --repeats must be >= 1")
    torch.set_num_threads(1)
    rows = []
    for model in ("small-cnn", "resnet20"):
        params, updates = _updates(model, args.buffer_size)
        plain = FedBuff(buffer_size=args.buffer_size)
        private = DPFedBuff(
            plain.settings, noise_multiplier=1.0, clipping_norm=1.0, seed=0
        )
        plain_s, dp_s = [], []
        for _ in range(3):  # alternate, so machine drift hits both
            plain_s += _time(plain, params, updates, args.repeats)
            dp_s += _time(private, params, updates, args.repeats)
        size = sum(x.size for x in params.values())
        fedbuff, dp = statistics.median(plain_s), statistics.median(dp_s)
        rows.append(
            [
                model,
                f"{size:,}",
                args.buffer_size,
                f"{fedbuff * 1e3:.1f}",
                f"{dp * 1e3:.1f}",
                f"{dp / fedbuff:.2f}x",
            ]
        )
    print(
        markdown_table(
            [
                "model",
                "parameters",
                "K",
                "FedBuff merge (ms)",
                "DP release (ms)",
                "ratio",
            ],
            rows,
        )
    )


if __name__ == "__main__":
    main()
