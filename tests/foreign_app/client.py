"""A plain Flower ClientApp that knows nothing of afl_flwr (numpy only).

Each node pulls the model toward its own target vector. Behaviour per node is
set by the environment so one app serves every scenario:

* ``FOREIGN_SLOW_PARTITION``: this partition sleeps 8x longer per task;
* ``FOREIGN_FAILING_PARTITIONS``: comma-separated partitions that raise.
"""

import os
import time

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

BASE_SLEEP_S = 0.1
SLOWDOWN = 8.0

app = ClientApp()


def _partition(context: Context) -> int:
    return int(context.node_config["partition-id"])


@app.train()
def train(msg: Message, context: Context) -> Message:
    partition = _partition(context)
    failing = os.environ.get("FOREIGN_FAILING_PARTITIONS", "")
    if str(partition) in failing.split(","):
        raise RuntimeError(f"partition {partition} cannot load its data")
    slow = os.environ.get("FOREIGN_SLOW_PARTITION", "")
    time.sleep(BASE_SLEEP_S * (SLOWDOWN if str(partition) == slow else 1.0))
    weights = msg.content["arrays"]["w"].numpy()
    target = np.full_like(weights, float(partition + 1))
    new = weights + 0.5 * (target - weights)
    content = RecordDict(
        {
            "arrays": ArrayRecord({"w": Array(new)}),
            "metrics": MetricRecord({"num-examples": 10, "train-loss": 1.0}),
        }
    )
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    weights = msg.content["arrays"]["w"].numpy()
    target = float(_partition(context) + 1)
    loss = float(np.mean((weights - target) ** 2))
    metrics = MetricRecord({"eval-loss": loss, "num-examples": 10})
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)
