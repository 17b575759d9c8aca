"""Keys shared by the ServerApp, the ClientApp and the strategy, each defined once.

Message keys travel inside ``ConfigRecord`` / ``MetricRecord`` objects; all are
kebab-case, as Flower's own (``num-examples``, ``server-round``).
"""

# Record names inside a Message's RecordDict (Flower's FedAvg defaults).
ARRAYS_KEY = "arrays"
CONFIG_KEY = "config"
METRICS_KEY = "metrics"
PROFILE_KEY = "profile"

# Train/evaluate config sent to clients.
SERVER_ROUND = "server-round"
BASE_VERSION = "base-version"
CLIENT_DELAY = "delay"
LOCAL_EPOCHS = "local-epochs"
TASK_SEED = "task-seed"
# Ask the client to reply UNIT_WEIGHT = 1 (Flower's accounted DP needs equal weights).
UNIT_WEIGHT = "unit-weight"
# Flower's KEY_CLIPPING_NORM: a client-side DP clipping norm (fixedclipping_mod).
CLIPPING_NORM_KEY = "clipping_norm"

# Metrics replied by clients.
NUM_EXAMPLES = "num-examples"
TRAIN_LOSS = "train-loss"
EPOCHS_RUN = "epochs-run"
STEPS = "steps"
EVAL_LOSS = "eval-loss"
EVAL_ACC = "eval-acc"

# Node profile (answer to a ``query.profile`` message).
QUERY_PROFILE = "query.profile"
PARTITION_ID = "partition-id"
NUM_PARTITIONS = "num-partitions"
SPEED_FACTOR = "speed-factor"
MAX_DELAY_S = "max-delay-s"

# Run-config key choosing where a SuperNode's train tasks run (afl_flwr.node_worker).
NODE_WORKER_KEY = "node-worker"
NODE_WORKER_MODES = ("auto", "on", "off")

# Names of the models in afl_flwr.models.MODELS (here so the run config is
# validated without importing torch; a test keeps the two equal).
MODEL_NAMES = ("mlp", "paper-cnn", "resnet20", "small-cnn")
