"""Token ids and logprobs as packed arrays: in the database (bytea) and on the wire (base64 in the JSON message).

A step carries about 1,400 numbers (the ids appended to the prompt, the completion's ids and their logprobs). As
JSON they were the hot path's biggest cost per byte: encoded into the model turn's message, decoded and encoded
again by the env worker for its INSERT, parsed into jsonb numerics by PostgreSQL, and turned back into text and
parsed again when the next turn rebuilt its prompt. Packed, each is one C call: ids as little-endian int32,
logprobs as little-endian float64 (lossless for any float a backend gives). The env worker never unpacks them
at all: the message's bytes go into the row as they came. docs: agents/README.md, "Where a step's time goes".

Everything that reads a Step through the ORM (rollouts, the API, the admin) sees plain lists, as before.
"""

from __future__ import annotations

import base64
import json
import sys
from array import array
from collections.abc import Sequence

from django.db import models

INT32 = "i"  # token ids: a vocabulary is far below 2**31
FLOAT64 = "d"  # logprobs


def pack(values: Sequence | None, typecode: str) -> bytes | None:
    """``values`` as little-endian bytes of ``typecode`` (None stays None). An id that does not fit raises
    OverflowError, a value of the wrong type TypeError."""
    if values is None:
        return None
    packed = array(typecode, values)
    if sys.byteorder == "big":
        packed.byteswap()
    return packed.tobytes()


def unpack(data: bytes | memoryview | None, typecode: str) -> list | None:
    if data is None:
        return None
    values = array(typecode)
    values.frombytes(data)
    if sys.byteorder == "big":
        values.byteswap()
    return values.tolist()


def join_turns(turns) -> list[int] | None:
    """The ids of the last of ``turns`` as the model saw and produced them. Each turn is (prompt_prefix_len,
    prompt_ids, completion_ids), the ids packed: its prompt is the previous turn's prompt + completion cut to
    ``prompt_prefix_len``, then its ``prompt_ids``. None when a turn has no ids (the model changed backend?)."""
    width = array(INT32).itemsize
    joined = bytearray()
    for prefix_len, appended, completion in turns:
        if appended is None or completion is None:
            return None
        del joined[(prefix_len or 0) * width :]
        joined += appended
        joined += completion
    return unpack(joined, INT32)


def to_wire(values: Sequence | None, typecode: str) -> str | None:
    """What a message carries: the packed bytes as base64 text (the messages are JSON)."""
    packed = pack(values, typecode)
    return None if packed is None else base64.b64encode(packed).decode("ascii")


def from_wire(value: str | list | None) -> bytes | list | None:
    """The packed bytes a message carried (``to_wire``), for a ``PackedArrayField`` to store as they are. A list (a
    message published before ids were packed) is kept: the field packs it."""
    return base64.b64decode(value, validate=True) if isinstance(value, str) else value


class PackedArrayField(models.BinaryField):
    """A list of numbers of one ``typecode`` stored packed (bytea on PostgreSQL, a BLOB on SQLite). Reads give a
    list; writes take a list, or bytes already packed (``pack``, ``from_wire``), which are stored as they are."""

    def __init__(self, *args, typecode: str = INT32, **kwargs):
        if typecode not in (INT32, FLOAT64):
            raise ValueError(f"typecode must be {INT32!r} (int32) or {FLOAT64!r} (float64), not {typecode!r}")
        self.typecode = typecode
        super().__init__(*args, **kwargs)

    def deconstruct(self):
        name, path, args, kwargs = super().deconstruct()
        kwargs["typecode"] = self.typecode
        return name, path, args, kwargs

    def from_db_value(self, value, expression, connection):
        return unpack(value, self.typecode)

    def to_python(self, value):
        if isinstance(value, bytes | bytearray | memoryview):
            return unpack(value, self.typecode)
        if isinstance(value, str):  # a fixture (``value_to_string``)
            return json.loads(value)
        return value

    def get_prep_value(self, value):
        if value is None or isinstance(value, bytes | bytearray | memoryview):
            return value
        return pack(value, self.typecode)

    def value_to_string(self, obj):
        """dumpdata writes the list as JSON, not as base64 of its bytes."""
        return json.dumps(self.value_from_object(obj))
