#!/usr/bin/env python3
"""Reads a BitClone9 topic from the beginning with tools independent of BitClone9: the
confluent-kafka consumer and fastavro, with schemas fetched from the registry by the id in each
record's Confluent wire-format header. Prints one JSON line per record:

  {"partition": 0, "offset": 5, "key": {...} | null, "value": {...} | null,
   "logical_errors": ["field: why", ...]}

Values are decoded twice: with fastavro's logical types (decimal, date, timestamps, uuid), as a
Python consumer would, and raw. The raw decoding must always work; where a logical conversion
fails (dates and timestamps Python cannot hold: infinity, BC, after 9999), the raw value is
printed and the failure listed in logical_errors.

  read-topic.py BOOTSTRAP REGISTRY_URL TOPIC [IDLE_SECONDS]
"""
import base64
import copy
import datetime
import decimal
import io
import json
import struct
import sys
import urllib.request
import uuid

import fastavro
from confluent_kafka import Consumer, TopicPartition

SCHEMAS = {}


def strip_logical(schema):
    """The schema without logical types, so values decode as their underlying Avro type."""
    if isinstance(schema, dict):
        return {k: strip_logical(v) for k, v in schema.items() if k != "logicalType"}
    if isinstance(schema, list):
        return [strip_logical(s) for s in schema]
    return schema


def schemas(registry, schema_id):
    if schema_id not in SCHEMAS:
        with urllib.request.urlopen(f"{registry.rstrip('/')}/schemas/ids/{schema_id}") as r:
            text = json.load(r)["schema"]
        parsed = json.loads(text)
        SCHEMAS[schema_id] = (
            fastavro.parse_schema(copy.deepcopy(parsed)),
            fastavro.parse_schema(strip_logical(parsed)),
        )
    return SCHEMAS[schema_id]


def plain(v):
    """JSON-friendly form of a decoded value."""
    if isinstance(v, dict):
        return {k: plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [plain(x) for x in v]
    if isinstance(v, bytes):
        return {"bytes": base64.b64encode(v).decode()}
    if isinstance(v, decimal.Decimal):
        return {"decimal": str(v)}
    if isinstance(v, (datetime.date, datetime.datetime, datetime.time)):
        return {"iso": v.isoformat()}
    if isinstance(v, uuid.UUID):
        return str(v)
    if isinstance(v, float) and (v != v or v in (float("inf"), float("-inf"))):
        return {"float": repr(v)}
    return v


def decode(registry, data, errors, what):
    if data is None:
        return None
    if len(data) < 5 or data[0] != 0:
        raise ValueError(f"{what}: not in the Confluent wire format")
    (schema_id,) = struct.unpack(">I", data[1:5])
    logical, raw = schemas(registry, schema_id)
    value = fastavro.schemaless_reader(io.BytesIO(data[5:]), raw, None)
    try:
        value = fastavro.schemaless_reader(io.BytesIO(data[5:]), logical, None)
    except (ValueError, OverflowError) as e:
        errors.append(f"{what}: {e}")
    return plain(value)


def main():
    bootstrap, registry, topic = sys.argv[1:4]
    idle = float(sys.argv[4]) if len(sys.argv) > 4 else 3.0
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": "bitclone9-read-topic",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
        }
    )
    meta = consumer.list_topics(topic, timeout=10)
    parts = sorted(meta.topics[topic].partitions)
    consumer.assign([TopicPartition(topic, p, 0) for p in parts])
    while True:
        msg = consumer.poll(idle)
        if msg is None:
            break
        if msg.error():
            raise RuntimeError(str(msg.error()))
        errors = []
        record = {
            "partition": msg.partition(),
            "offset": msg.offset(),
            "key": decode(registry, msg.key(), errors, "key"),
            "value": decode(registry, msg.value(), errors, "value"),
            "logical_errors": errors,
        }
        print(json.dumps(record, sort_keys=True))
    consumer.close()


if __name__ == "__main__":
    main()
