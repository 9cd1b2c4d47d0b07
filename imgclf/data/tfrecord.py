"""Reading TFRecord files of ``tf.train.Example`` records without TensorFlow: how a prepared TFDS
dataset (its default file format) is read by the download stage, which then needs no TensorFlow
import (4-5 s on 2 cores) and no tf.data pipeline. The framing and the protobuf wire format are
those of TensorFlow's ``tfrecord`` and ``example.proto``; only bytes and int64 features are read."""
from __future__ import annotations

import struct
from pathlib import Path
from typing import Iterator

from ..errors import DataError

_HEADER = 12  # uint64 length, uint32 masked CRC of the length
_FOOTER = 4  # uint32 masked CRC of the data


def read_records(path: Path) -> Iterator[bytes]:
    """The records of one TFRecord file, in order; a DataError naming the file if it is cut short."""
    with open(path, "rb") as fh:
        while header := fh.read(_HEADER):
            if len(header) < _HEADER:
                raise DataError(f"{path}: truncated TFRecord file (a partial record header)")
            (length,) = struct.unpack("<Q", header[:8])
            data = fh.read(length)
            if len(data) < length or len(fh.read(_FOOTER)) < _FOOTER:
                raise DataError(f"{path}: truncated TFRecord file (a record of {length} bytes is cut short)")
            yield data


def read_examples(path: Path, needed: tuple[str, ...] = ()) -> Iterator[dict[str, list]]:
    """The ``tf.train.Example`` records of one TFRecord file as :func:`example_features`; a
    DataError naming the file for a record that is not one or lacks one of the ``needed`` features."""
    for number, record in enumerate(read_records(path)):
        try:
            features = example_features(record)
        except DataError as err:
            raise DataError(f"{path}: record {number}: {err}") from None
        missing = [name for name in needed if not features.get(name)]
        if missing:
            raise DataError(f"{path}: record {number} has no {' or '.join(missing)} feature")
        yield features


def example_features(record: bytes) -> dict[str, list]:
    """A serialized ``tf.train.Example`` as {feature name: values}: a list of bytes for a
    ``bytes_list``, of ints for an ``int64_list`` (a ``float_list`` gives an empty list)."""
    features = {}
    for number, _, message in _fields(record):
        if number != 1:  # Example.features
            continue
        for entry_number, _, entry in _fields(message):
            if entry_number != 1:  # Features.feature, a map: entries of key (1) and value (2)
                continue
            key, values = "", []
            for field, _, value in _fields(entry):
                if field == 1:
                    key = bytes(value).decode()
                elif field == 2:
                    values = _feature_values(value)
            features[key] = values
    return features


def _feature_values(feature: memoryview) -> list:
    values = []
    for kind, _, payload in _fields(feature):  # 1 bytes_list, 2 float_list, 3 int64_list
        for field, wire, value in _fields(payload):
            if field != 1:
                continue
            if kind == 1:
                values.append(bytes(value))
            elif kind == 3:
                values.extend(_packed_varints(value) if wire == 2 else [_signed(value)])
    return values


def _fields(buffer) -> Iterator[tuple[int, int, object]]:
    """(field number, wire type, value) of each field of a protobuf message: a varint as an int,
    a length-delimited field as a memoryview of its bytes."""
    view, i = memoryview(buffer), 0
    while i < len(view):
        key, i = _varint(view, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(view, i)
        elif wire == 2:
            length, i = _varint(view, i)
            value, i = view[i:i + length], i + length
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            value, i = view[i:i + size], i + size
        else:
            raise DataError(f"not a tf.train.Example record (protobuf wire type {wire})")
        if i > len(view):
            raise DataError("not a tf.train.Example record (a field runs past its end)")
        yield number, wire, value


def _varint(view: memoryview, i: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if i >= len(view):
            raise DataError("not a tf.train.Example record (a varint runs past its end)")
        byte = view[i]
        i += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, i
        shift += 7


def _packed_varints(view: memoryview) -> list[int]:
    values, i = [], 0
    while i < len(view):
        value, i = _varint(view, i)
        values.append(_signed(value))
    return values


def _signed(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value  # int64 is two's complement on the wire
