"""Weights & Biases (--wandb-project), offline: the run's history, read back from its offline run file, equals
metrics.jsonl record for record, with an expert-load image at each evaluation and the config logged once."""

from __future__ import annotations

import glob
import json
import struct

import pytest

from moetrain.train.trainer import Trainer
from tests.helpers import read_records, tiny_config

wandb = pytest.importorskip("wandb", reason='W&B is an optional extra: pip install "moetrain[wandb]"')

BLOCK, HEADER = 32768, 7  # the run file is a LevelDB-style log: 32 KiB blocks of (crc, length, kind) records
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_run_records(path: str) -> list:
    """Every protobuf Record of an offline .wandb run file."""
    from wandb.proto import wandb_internal_pb2

    data = open(path, "rb").read()
    pos, payloads, pending = HEADER, [], b""  # the file starts with its own 7-byte header
    while pos + HEADER <= len(data):
        room = BLOCK - pos % BLOCK
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        if room < HEADER or (length == 0 and kind == 0):  # a block's zero-filled tail
            pos += room
            continue
        payload, pos = data[pos + HEADER:pos + HEADER + length], pos + HEADER + length
        pending = payload if kind in (FULL, FIRST) else pending + payload
        if kind in (FULL, LAST):
            payloads.append(pending)
    records = []
    for payload in payloads:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        records.append(record)
    return records


def history_row(record) -> dict:
    """A history record's values by key; W&B splits a dict value into nested keys, put back together here."""
    row: dict = {}
    for item in record.history.item:
        keys = list(item.nested_key) or [item.key]
        target = row
        for key in keys[:-1]:
            target = target.setdefault(key, {})
        target[keys[-1]] = json.loads(item.value_json)
    return row


def test_offline_history_equals_metrics_jsonl(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = tiny_config(tmp_path, train_iters=4, log_interval=1, eval_interval=2)
    cfg.monitor.wandb_project, cfg.monitor.wandb_exp_name = "moetrain-test", "offline"
    trainer = Trainer(cfg, quiet=True)
    trainer.fit()
    [path] = glob.glob(str(tmp_path / "run" / "wandb" / "**" / "offline-run-*" / "run-*.wandb"), recursive=True)
    records = read_run_records(path)
    rows = [history_row(record) for record in records if record.WhichOneof("record_type") == "history"]
    logged, images = [], 0
    for row in rows:
        kind = next(key for key in row if not key.startswith("_")).split("/")[0]
        images += f"{kind}/expert_load" in row
        charts = (f"{kind}/moe_layer_", f"{kind}/expert_load")  # the charts' extra keys
        fields = {key.split("/", 1)[1]: value for key, value in row.items()
                  if key.startswith(f"{kind}/") and not key.startswith(charts)}
        logged.append({"type": kind, **fields})
    metrics = read_records(tmp_path / "run")
    assert [r["type"] for r in metrics] == ["train", "train", "eval", "train", "train", "eval"]
    assert logged == metrics
    assert images == 2  # one heatmap per evaluation
    runs = [record.run for record in records if record.WhichOneof("record_type") == "run"]
    config = {item.key: json.loads(item.value_json) for run in runs for item in run.config.update
              if not item.key.startswith("_")}
    assert len(runs) == 1 and config == json.loads(json.dumps(trainer.cfg.to_dict()))  # the run's config, once
