"""``accelerate launch tests/comfy_train/ranks.py --config … --set …``: ``train.fit`` with a per-rank record.

Runs the trainer's command line unchanged and writes ``$CID_RECORD_DIR/rank<r>.json`` with the run's
summary and the sample indices this process trained on, so a test can check that every rank ends
with the same weights and that the ranks read disjoint shards. ``CID_INF_LOSS_RANK=r`` and
``CID_INF_LOSS_CALL=k`` make rank ``r``'s ``k``-th micro-batch loss +inf with finite gradients
(a value only that process sees): the all-reduced skip must keep the replicas equal.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch


def main() -> None:
    from train import fit
    from train.step import TrainingModule

    rank = int(os.environ.get("RANK", "0"))
    poisoned_rank = int(os.environ.get("CID_INF_LOSS_RANK", "-1"))
    poisoned_call = int(os.environ.get("CID_INF_LOSS_CALL", "-1"))
    seen: list[list[int]] = []
    forward = TrainingModule.forward

    def recording(self, batch, generator):
        result = forward(self, batch, generator)
        seen.append([int(i) for i in batch["index"]])
        if rank == poisoned_rank and len(seen) == poisoned_call:
            result["loss"] = result["loss"] + torch.tensor(float("inf"))
        return result

    TrainingModule.forward = recording
    torch.set_num_threads(1)
    summary = fit.main(sys.argv[1:])
    record = Path(os.environ["CID_RECORD_DIR"]) / f"rank{rank}.json"
    record.write_text(json.dumps({"summary": summary, "indices": seen}), encoding="utf-8")


if __name__ == "__main__":
    main()
