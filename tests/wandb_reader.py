"""Reads an offline W&B run file (``run-*.wandb``): a LevelDB-style log of protobuf records.
wandb 0.31 ships no reader for it, so the tests carry this small one."""

import glob
import json
import os
import struct
import time
from typing import Any, Dict, List

from wandb.proto import wandb_internal_pb2

BLOCK = 32 * 1024
HEADER = 7  # ":W&B" + magic (2 bytes) + version (1 byte)


def records(path: str) -> List[Any]:
    data = open(path, "rb").read()
    assert data[:4] == b":W&B", "not a W&B run file"
    out, pending, pos = [], b"", HEADER
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pos += 7
        if pos + length > len(data):  # a record still being written
            break
        payload = data[pos:pos + length]
        pos += length
        if kind == 1:
            out.append(payload)
        elif kind == 2:
            pending = payload
        elif kind == 3:
            pending += payload
        elif kind == 4:
            out.append(pending + payload)
        elif kind == 0 and length == 0:
            pos += BLOCK - pos % BLOCK if pos % BLOCK else 0
    return [wandb_internal_pb2.Record.FromString(p) for p in out]


def read_run(save_dir: str, timeout: float = 60.0) -> Dict[str, Any]:
    """history rows, summary, config and metric definitions of the single offline run in save_dir.

    wandb's service writes the file asynchronously, even after ``finish()`` returns: wait until the
    run's exit record is on disk."""
    files = glob.glob(os.path.join(save_dir, "wandb", "offline-run-*", "run-*.wandb"))
    assert len(files) == 1, files
    deadline = time.monotonic() + timeout
    while not any(r.WhichOneof("record_type") == "exit" for r in records(files[0])):
        assert time.monotonic() < deadline, f"{files[0]} has no exit record after {timeout}s"
        time.sleep(0.1)
    run = {"history": [], "summary": {}, "config": {}, "metrics": [], "dir": os.path.dirname(files[0]),
           "kinds": [], "size": os.path.getsize(files[0])}
    for rec in records(files[0]):
        kind = rec.WhichOneof("record_type")
        run["kinds"].append(kind)
        if kind == "history":
            row: Dict[str, Any] = {}
            for i in rec.history.item:
                if i.key:
                    row[i.key] = json.loads(i.value_json)
                else:  # media are stored as nested fields: ["intrafusion/history", "path"]
                    node = row
                    for part in i.nested_key[:-1]:
                        node = node.setdefault(part, {})
                    node[i.nested_key[-1]] = json.loads(i.value_json)
            run["history"].append(row)
        elif kind == "summary":
            for i in rec.summary.update:
                run["summary"][i.key or "/".join(i.nested_key)] = json.loads(i.value_json)
        elif kind == "config":
            for i in rec.config.update:
                run["config"][i.key or "/".join(i.nested_key)] = json.loads(i.value_json)
        elif kind == "metric":
            run["metrics"].append((rec.metric.name or rec.metric.glob_name, rec.metric.step_metric))
    return run
