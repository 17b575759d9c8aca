"""Server-side cost of merging one client update, against the physical limit.

The limit is one fused pass over the parameters: ``x += a * y`` (torch ``add_``
with ``alpha``, i.e. an axpy) on the same float32 buffers. The merge paths timed:

* ``immediate``: FedAsync mix ``x <- (1 - c) x + c x_i`` (``mix_immediate``);
* ``buffered``: FedBuff flush of K updates (``fedbuff_update``), per update;
* ``+ validation``: the same, plus the strategy's reply validation and decoding
  (``parse_train_reply``: names/shapes/dtypes, NaN/Inf scan, zero-copy view of
  the reply's bytes), i.e. the full server path for one reply.

Models: ResNet-20 (~0.27M parameters) and torchvision's ResNet-18 (~11.7M).
Every ratio is measured in the same run as its baseline. Usage::

    python benchmarks/merge_cost.py [--repeats 30] [--buffer 5]
"""

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from torchvision.models import resnet18

from afl_flwr.aggregation import fedbuff_update, mix_immediate
from afl_flwr.models import ResNet20
from afl_flwr.replies import model_spec, parse_train_reply


def timeit(fn: Callable[[], object], repeats: int) -> float:
    """Median seconds of ``fn`` over ``repeats`` runs (after one warm-up)."""
    fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def float_params(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def reply_for(params: dict[str, np.ndarray], seed: int) -> Message:
    rng = np.random.default_rng(seed)
    noisy = {
        k: (v + rng.normal(scale=1e-3, size=v.shape).astype(v.dtype))
        if np.issubdtype(v.dtype, np.floating)
        else v
        for k, v in params.items()
    }
    content = RecordDict(
        {
            "arrays": ArrayRecord({k: torch.from_numpy(v) for k, v in noisy.items()}),
            "metrics": MetricRecord({"num-examples": 100}),
        }
    )
    instruction = Message(RecordDict(), dst_node_id=1, message_type="train")
    instruction.metadata.__dict__["_message_id"] = f"m{seed}"
    return Message(content, reply_to=instruction)


def bench(name: str, model: torch.nn.Module, repeats: int, k: int) -> dict[str, float]:
    params = float_params(model)
    n_params = sum(v.size for v in params.values())
    spec = model_spec(params)
    replies = [reply_for(params, s) for s in range(k)]
    parsed = [parse_train_reply(r, spec).params for r in replies]

    floats = {n: v for n, v in params.items() if v.dtype.kind == "f"}
    x = {n: torch.from_numpy(v.copy()) for n, v in floats.items()}
    y = {n: torch.from_numpy(parsed[0][n].copy()) for n in x}

    def axpy() -> None:
        for n, t in x.items():
            t.add_(y[n], alpha=1e-3)

    work = {n: v.copy() for n, v in params.items()}

    def immediate() -> None:
        mix_immediate(work, parsed[0], 0.5)

    def immediate_full() -> None:
        update = parse_train_reply(replies[0], spec).params
        mix_immediate(work, update, 0.5)

    stale_base = {n: v.copy() for n, v in params.items()}
    bases = [params] * (k - 1) + [stale_base]

    def buffered_fresh() -> None:
        fedbuff_update(params, parsed, [params] * k, [1.0] * k, [1.0] * k, 1.0)

    def buffered() -> None:
        fedbuff_update(params, parsed, bases, [1.0] * k, [0.5] * k, 1.0)

    def buffered_full() -> None:
        updates = [parse_train_reply(r, spec).params for r in replies]
        fedbuff_update(params, updates, bases, [1.0] * k, [0.5] * k, 1.0)

    base = timeit(axpy, repeats)
    rows = {
        "axpy (limit)": base,
        "immediate": timeit(immediate, repeats),
        "immediate + validation": timeit(immediate_full, repeats),
        f"buffered K={k}, zero staleness (FedAvg-exact)": timeit(
            buffered_fresh, repeats
        )
        / k,
        f"buffered K={k}, per update": timeit(buffered, repeats) / k,
        f"buffered K={k} + validation, per update": timeit(buffered_full, repeats) / k,
    }
    mib = n_params * 4 / 2**20
    print(f"\n{name}: {n_params / 1e6:.2f}M parameters ({mib:.1f} MiB float32)")
    print(f"| {'path':46s} | {'ms':>8s} | {'x axpy':>7s} |")
    print(f"|{'-' * 48}|{'-' * 10}|{'-' * 9}|")
    for label, seconds in rows.items():
        print(f"| {label:46s} | {seconds * 1e3:8.3f} | {seconds / base:7.2f} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--buffer", type=int, default=5)
    args = parser.parse_args()
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    torch.set_num_threads(1)  # one core, as the server thread gets in simulation
    print(f"torch {torch.__version__}, numpy {np.__version__}, 1 thread")
    bench("ResNet-20", ResNet20(), args.repeats, args.buffer)
    bench("ResNet-18 (torchvision)", resnet18(), max(5, args.repeats // 3), args.buffer)


if __name__ == "__main__":
    main()
