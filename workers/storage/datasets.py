"""Reading a dataset from the owner's local files: CSV with a header, ``.npy`` or
``.safetensors``. Never pickle: ``.npy`` is read with ``allow_pickle=False`` and
``.pt``/``.pkl`` files are refused.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from protocol.codec import dtype_name
from protocol.errors import InvalidRequest


def load_table(path: Path) -> tuple[torch.Tensor, list[str]]:
    """Return the data as a tensor and its column names (empty when the file has none)."""
    suffix = path.suffix.lower()
    if not path.exists():
        raise InvalidRequest(f"dataset file {path} does not exist")
    if suffix == ".csv":
        return _load_csv(path)
    if suffix == ".npy":
        try:
            array = np.load(path, allow_pickle=False)
        except ValueError as exc:  # e.g. an object array, which only pickle could read
            raise InvalidRequest(f"{path}: cannot be read without pickle, which gridq never uses: {exc}") from None
        tensor = torch.from_numpy(np.ascontiguousarray(array))
        dtype_name(tensor.dtype)
        return tensor, []
    if suffix == ".safetensors":
        tensors = load_file(str(path))
        if len(tensors) != 1:
            raise InvalidRequest(f"{path} must hold exactly one tensor, it holds {sorted(tensors)}")
        return next(iter(tensors.values())), []
    raise InvalidRequest(f"{path}: unsupported dataset format {suffix!r}; use .csv, .npy or .safetensors")


def _load_csv(path: Path) -> tuple[torch.Tensor, list[str]]:
    """A CSV as float64: a decimal such as 3.14 stays the number its owner wrote (float32
    would make it 3.1399998664855957). An owner who wants another dtype declares it."""
    with path.open(newline="") as f:
        reader = csv.reader(f)
        try:
            header = next(reader)
        except StopIteration:
            raise InvalidRequest(f"{path} is empty; a CSV dataset needs a header row") from None
        rows = []
        for line_no, row in enumerate(reader, start=2):
            if not row:
                continue
            if len(row) != len(header):
                raise InvalidRequest(f"{path}:{line_no}: {len(row)} fields, the header has {len(header)}")
            try:
                rows.append([float(v) for v in row])
            except ValueError as exc:
                raise InvalidRequest(f"{path}:{line_no}: not a number: {exc}") from None
    return torch.tensor(rows, dtype=torch.float64).reshape(len(rows), len(header)), [h.strip() for h in header]
