"""A keepbest.torch.SidecarEvaluator in a process of its own: ``python -m tests.torch.sidecar_child DIR OUT``.

When it stops it writes one JSON line to OUT: the steps it evaluated with their loss and accuracy, and why it
stopped.
"""

from __future__ import annotations

import json
import sys

import torch

from keepbest.torch import SidecarEvaluator, accuracy
from tests.torch.test_sidecar import build, val_loader


def main() -> None:
    torch.manual_seed(0)
    evaluator = SidecarEvaluator(build, val_loader(), sys.argv[1], metrics={"accuracy": accuracy}, idle_timeout=60,
                           poll_interval=0.1)
    evaluator.start()
    with open(sys.argv[2], "a") as f:
        f.write(json.dumps({"evaluated": [[c.step, m] for c, m in evaluator.evaluated],
                            "stop": evaluator.stop_reason}) + "\n")


if __name__ == "__main__":
    main()
