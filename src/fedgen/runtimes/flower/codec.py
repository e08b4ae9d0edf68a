"""Requests and replies (core/records.py) as Flower messages.

Each named tensor dict travels packed: its tensors' bytes, one after the other, as the single Array of an
ArrayRecord, and their names, dtypes and shapes in the JSON of the values (bit-exact for every dtype, bfloat16
included). Flower stores and transfers every Array as an object of its own, with a request per object in a
deployment (about 20 ms of the SuperLink's CPU each here): a U-Net's 115-153 tensors as separate Arrays cost
seconds per message, one packed Array a single request. Plain values travel as one JSON string in a ConfigRecord
(ConfigRecord holds no nested structures). The run's resolved config rides along with every request so that a
silo needs nothing but its own data.
"""

from __future__ import annotations

import json

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, RecordDict

from fedgen.core.records import Reply, Request

MESSAGE_TYPES = {"describe": MessageType.QUERY, "fit": MessageType.TRAIN, "evaluate": MessageType.EVALUATE,
                 "pga-step": f"{MessageType.TRAIN}.pga", "merf-release": f"{MessageType.QUERY}.merf"}
_ARRAYS = "arrays."


def pack(state: dict[str, torch.Tensor]) -> tuple[np.ndarray, list]:
    """(the tensors' bytes in one uint8 array, [[name, dtype, shape], ...] in that order)."""
    tensors = [t.detach().contiguous().cpu() for t in state.values()]
    index = [[name, str(t.dtype).removeprefix("torch."), list(t.shape)] for name, t in zip(state, tensors, strict=True)]
    blob = torch.cat([t.reshape(-1).view(torch.uint8) for t in tensors] or [torch.empty(0, dtype=torch.uint8)])
    return blob.numpy(), index


def unpack(blob: np.ndarray, index: list) -> dict[str, torch.Tensor]:
    """The tensors `pack` wrote, each a copy (aligned for its dtype, not sharing the message's buffer)."""
    data = torch.from_numpy(np.ascontiguousarray(blob, dtype=np.uint8))
    sizes = [int(np.prod(shape, dtype=np.int64)) * torch.empty(0, dtype=getattr(torch, dtype)).element_size()
             for _, dtype, shape in index]
    if sum(sizes) != len(data):
        raise ValueError(f"packed tensors: {len(data)} bytes, the index accounts for {sum(sizes)}")
    out, offset = {}, 0
    for (name, dtype, shape), n in zip(index, sizes, strict=True):
        out[name] = data[offset:offset + n].clone().view(getattr(torch, dtype)).reshape(shape)
        offset += n
    return out


def _records(arrays: dict, values: dict) -> RecordDict:
    content, index = RecordDict(), {}
    for name, state in arrays.items():
        blob, index[name] = pack(state)
        content[f"{_ARRAYS}{name}"] = ArrayRecord({"packed": Array(blob)})
    content["values"] = ConfigRecord({"json": json.dumps(values | {"_index": index})})
    return content


def _unpack(content: RecordDict) -> tuple[dict, dict]:
    values = json.loads(content.config_records["values"]["json"])
    index = values.pop("_index")
    arrays = {key[len(_ARRAYS):]: unpack(record["packed"].numpy(), index[key[len(_ARRAYS):]])
              for key, record in content.array_records.items() if key.startswith(_ARRAYS)}
    return arrays, values


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
