"""Run under torchrun (2 ranks, gloo): one epoch of training batches per rank with 2 DataLoader
workers, three times: uninterrupted; cut after N batches; "resumed" in a fresh stream by skipping
the N batches already trained (what ``train.loop.run_stage`` does from a checkpoint's position).
Writes each rank's user ids per batch to <out>/rank<r>.json.

    torchrun --nproc_per_node 2 tests/dist_stream_resume.py <prepared folder> <out> <N> <resampled 0|1>
"""
import json
import sys
from itertools import islice
from pathlib import Path

from train.data.prepare import load_manifest
from train.data.stream import ReaderOptions, train_batches
from train.engine import exit_now_if_distributed, setup_distributed, teardown_distributed

folder, out, cut, resampled = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
env, _ = setup_distributed()
m = load_manifest(folder)
reader = ReaderOptions(num_workers=2, resampled=resampled)


def epoch():
    return train_batches(m, folder, "A", batch_size=6, max_len=12, seed=1, epoch=2, buffer=25, reader=reader,
                         epoch_batches=12 if resampled else None)


users = lambda batches: [b["user"].tolist() for b in batches]
full = users(epoch())
first = users(islice(iter(epoch()), cut))
it = iter(epoch())
for _ in range(cut):  # the resumed process replays the stream position, then trains on
    next(it)
resumed = users(it)
out.mkdir(parents=True, exist_ok=True)
(out / f"rank{env.rank}.json").write_text(json.dumps({"full": full, "first": first, "resumed": resumed}))
teardown_distributed()
exit_now_if_distributed(0)
