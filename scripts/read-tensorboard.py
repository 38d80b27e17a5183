#!/usr/bin/env python3
"""Read a directory of TensorBoard event files with TensorBoard's own reader and print what it holds as JSON.

    python3 scripts/read-tensorboard.py runs/quickstart/tb

Prints {"files": [names], "file_version": 2.0, "scalars": {tag: [[step, value], ...]}} (values are the stored
f32s, exactly). tests/tensorboard.rs compares it with metrics.jsonl. Needs the `tensorboard` package
(scripts/test.sh installs a pinned one and puts it on PYTHONPATH).
"""
import json
import os
import sys

from tensorboard.backend.event_processing import event_accumulator


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: read-tensorboard.py DIR")
    path = sys.argv[1]
    # 0 = keep every event (the default keeps a sample of 10,000 scalars per tag).
    acc = event_accumulator.EventAccumulator(path, size_guidance={event_accumulator.SCALARS: 0})
    acc.Reload()
    scalars = {
        tag: [[e.step, e.value] for e in acc.Scalars(tag)] for tag in sorted(acc.Tags()[event_accumulator.SCALARS])
    }
    files = sorted(f for f in os.listdir(path) if f.startswith("events.out.tfevents."))
    json.dump({"files": files, "file_version": acc.file_version, "scalars": scalars}, sys.stdout)
    print()


if __name__ == "__main__":
    main()
