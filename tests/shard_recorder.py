"""A callback the distributed tests add by class path: each rank writes the rows it trains on per epoch.

``--trainer.callbacks+=shard_recorder.ShardRecorder`` with ``tests/`` on PYTHONPATH; files go to
$SHARD_RECORDER_DIR/rank<R>-epoch<E>.json.
"""

import json
import os
from pathlib import Path

from lightning.pytorch import Callback


class ShardRecorder(Callback):
    def on_train_epoch_start(self, trainer, pl_module):
        rows = trainer.train_dataloader.sampler.indices().tolist()  # what this epoch's iteration visits
        out = Path(os.environ["SHARD_RECORDER_DIR"]) / f"rank{trainer.global_rank}-epoch{trainer.current_epoch}.json"
        out.write_text(json.dumps(rows))
