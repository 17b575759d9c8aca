"""``python -m afl_flwr.experiments``."""

import sys

from afl_flwr.experiments import main

sys.exit(main())
