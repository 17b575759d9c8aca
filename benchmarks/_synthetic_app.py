"""A synthetic-data ClientApp for the scale benchmark: fixed work, no dataset.

Each train task trains a small MLP (784-64-10, ~51k parameters) on random
tensors drawn from the task's seed for a fixed number of SGD steps, so every
task costs the same real PyTorch work whatever the node; it measures
throughput, not learning. ``query.profile`` is answered with a
:class:`~afl_flwr.clock.NodeProfile` so the virtual clock works. The same
:func:`train_task` is what the benchmark's bare loop runs.
"""

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from afl_flwr.clock import NodeProfile
from afl_flwr.constants import (
    ARRAYS_KEY,
    CONFIG_KEY,
    METRICS_KEY,
    NUM_EXAMPLES,
    PROFILE_KEY,
    STEPS,
    TASK_SEED,
    TRAIN_LOSS,
)

FEATURES, HIDDEN, CLASSES = 784, 64, 10
BATCH_SIZE = 64
SGD_STEPS = 20
EXAMPLES = BATCH_SIZE * SGD_STEPS

app = ClientApp()


def make_model() -> torch.nn.Module:
    """The benchmark's model: a 784-64-10 MLP."""
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(FEATURES, HIDDEN),
        torch.nn.ReLU(),
        torch.nn.Linear(HIDDEN, CLASSES),
    )


def model_arrays() -> dict[str, np.ndarray]:
    """The model's initial weights as NumPy arrays."""
    return {k: v.detach().numpy().copy() for k, v in make_model().state_dict().items()}


def train_task(model: torch.nn.Module, seed: int) -> float:
    """``SGD_STEPS`` steps on random data drawn from ``seed``; the mean loss."""
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(EXAMPLES, FEATURES, generator=generator)
    labels = torch.randint(0, CLASSES, (EXAMPLES,), generator=generator)
    optimiser = torch.optim.SGD(model.parameters(), lr=0.01)
    total = 0.0
    for step in range(SGD_STEPS):
        batch = slice(step * BATCH_SIZE, (step + 1) * BATCH_SIZE)
        optimiser.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(inputs[batch]), labels[batch])
        loss.backward()
        optimiser.step()
        total += loss.item()
    return total / SGD_STEPS


def node_profile(partition_id: int) -> NodeProfile:
    """A node's profile: speeds 1-10x spread deterministically over partitions."""
    return NodeProfile(
        partition_id=partition_id,
        num_examples=EXAMPLES,
        speed_factor=1.0 + (partition_id * 7919 % 10),
        max_delay_s=0.5,
    )


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received model on this task's random data."""
    model = make_model()
    model.load_state_dict(msg.content.array_records[ARRAYS_KEY].to_torch_state_dict())
    config = msg.content.config_records.get(CONFIG_KEY)
    seed = int(config.get(TASK_SEED, 0)) if config else 0  # type: ignore[arg-type]
    loss = train_task(model, seed)
    metrics = MetricRecord({NUM_EXAMPLES: EXAMPLES, TRAIN_LOSS: loss, STEPS: SGD_STEPS})
    content = RecordDict(
        {ARRAYS_KEY: ArrayRecord(model.state_dict()), METRICS_KEY: metrics}
    )
    return Message(content=content, reply_to=msg)


@app.query("profile")
def profile(msg: Message, context: Context) -> Message:
    """Reply with this node's profile."""
    partition = int(context.node_config.get("partition-id", 0))  # type: ignore[arg-type]
    record = node_profile(partition).to_record()
    return Message(content=RecordDict({PROFILE_KEY: record}), reply_to=msg)
