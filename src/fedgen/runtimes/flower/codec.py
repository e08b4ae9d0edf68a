"""Requests and replies (core/records.py) as Flower messages.

Tensors travel as ArrayRecords (bit-exact for float16/32/64 and integer tensors); plain values as one JSON string
in a ConfigRecord (ConfigRecord holds no nested structures). The run's resolved config rides along with every
request so that a silo needs nothing but its own data: a SuperNode starts a new ClientApp process per message.
"""

from __future__ import annotations

import json

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict

from fedgen.core.records import Reply, Request

MESSAGE_TYPES = {"describe": MessageType.QUERY, "fit": MessageType.TRAIN, "evaluate": MessageType.EVALUATE,
                 "pga-step": f"{MessageType.TRAIN}.pga", "merf-release": f"{MessageType.QUERY}.merf"}
_ARRAYS = "arrays."


def _records(arrays: dict, values: dict) -> RecordDict:
    content = RecordDict({f"{_ARRAYS}{name}": ArrayRecord(state) for name, state in arrays.items()})
    content["values"] = ConfigRecord({"json": json.dumps(values)})
    return content


def _unpack(content: RecordDict) -> tuple[dict, dict]:
    arrays = {key[len(_ARRAYS):]: record.to_torch_state_dict() for key, record in content.array_records.items()
              if key.startswith(_ARRAYS)}
    return arrays, json.loads(content.config_records["values"]["json"])


def request_message(request: Request, run: dict, node_id: int, ttl: float, group: str) -> Message:
    values = {"kind": request.kind, "silo": request.silo, "config": request.config, "run": run}
    return Message(_records(request.arrays, values), dst_node_id=node_id, message_type=MESSAGE_TYPES[request.kind],
                   ttl=ttl, group_id=group)


def decode_request(message: Message) -> tuple[Request, dict]:
    arrays, values = _unpack(message.content)
    return Request(int(values["silo"]), values["kind"], arrays, values["config"]), values["run"]


def reply_message(reply: Reply, to: Message) -> Message:
    return Message(_records(reply.arrays, {"silo": reply.silo, "config": reply.config}), reply_to=to)


def decode_reply(message: Message) -> Reply:
    arrays, values = _unpack(message.content)
    return Reply(int(values["silo"]), arrays, values["config"])
