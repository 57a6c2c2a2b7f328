"""Tensor codec: safetensors bytes, never pickle.

Only dtypes on the allow-list travel, and no tensor bigger than ``MAX_ELEMENTS`` is
decoded, so a hostile message cannot make a worker allocate without bound.

    >>> data = encode_tensor(torch.arange(4.0))
    >>> decode_tensor(data).tolist()
    [0.0, 1.0, 2.0, 3.0]
"""

from __future__ import annotations

import json
import math

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from protocol.errors import InvalidRequest, LimitExceeded

MAX_ELEMENTS = 64 * 1024 * 1024
ALLOWED_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in ALLOWED_DTYPES.items()}
_KEY = "t"


def dtype_name(dtype: torch.dtype) -> str:
    try:
        return DTYPE_NAMES[dtype]
    except KeyError:
        raise InvalidRequest(f"dtype {dtype} is not allowed; use one of {sorted(ALLOWED_DTYPES)}") from None


def parse_dtype(name: str) -> torch.dtype:
    try:
        return ALLOWED_DTYPES[name]
    except KeyError:
        raise InvalidRequest(f"dtype {name!r} is not allowed; use one of {sorted(ALLOWED_DTYPES)}") from None


def check_size(shape: tuple[int, ...] | torch.Size, limit: int = MAX_ELEMENTS) -> int:
    count = math.prod(shape)
    if count > limit:
        raise LimitExceeded(f"tensor of shape {tuple(shape)} has {count} elements; the limit is {limit}")
    return count


def encode_tensor(tensor: torch.Tensor, limit: int = MAX_ELEMENTS) -> bytes:
    dtype_name(tensor.dtype)
    check_size(tensor.shape, limit)
    return save({_KEY: tensor.detach().contiguous().cpu()})


def _check_header(data: bytes, limit: int) -> None:
    """Read the safetensors header and enforce the limits before anything is allocated."""
    if len(data) < 8:
        raise InvalidRequest("not a safetensors tensor: too short")
    size = int.from_bytes(data[:8], "little")
    if size > 64 * 1024 or size + 8 > len(data):
        raise InvalidRequest("not a safetensors tensor: bad header length")
    try:
        header = json.loads(data[8 : 8 + size])
        entries = {k: v for k, v in header.items() if k != "__metadata__"}
        shapes = [tuple(int(d) for d in v["shape"]) for v in entries.values()]
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise InvalidRequest(f"not a safetensors tensor: bad header: {exc}") from None
    for shape in shapes:
        check_size(shape, limit)


def decode_tensor(data: bytes, limit: int = MAX_ELEMENTS) -> torch.Tensor:
    _check_header(data, limit)
    try:
        tensors = load(data)
    except (SafetensorError, ValueError, OSError) as exc:
        raise InvalidRequest(f"not a safetensors tensor: {exc}") from None
    if set(tensors) != {_KEY}:
        raise InvalidRequest("a tensor message must hold exactly one tensor")
    tensor = tensors[_KEY]
    dtype_name(tensor.dtype)
    check_size(tensor.shape, limit)
    return tensor
