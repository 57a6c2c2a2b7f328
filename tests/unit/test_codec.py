"""The safetensors tensor codec: round trips, the dtype allow-list and the element cap."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save

import protocol.codec as codec
from protocol.codec import (
    ALLOWED_DTYPES,
    DTYPE_NAMES,
    MAX_ELEMENTS,
    check_size,
    decode_tensor,
    dtype_name,
    encode_tensor,
    parse_dtype,
)
from protocol.errors import InvalidRequest, LimitExceeded

FAST = settings(max_examples=60, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow])

shapes = st.lists(st.integers(min_value=0, max_value=5), min_size=0, max_size=4).map(tuple)


def _sample(dtype: torch.dtype, shape: tuple[int, ...] = (3, 4)) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) > 0.5
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=g, dtype=torch.float64) * 100).to(dtype)
    info = torch.iinfo(dtype)
    low, high = max(info.min, -1000), min(info.max, 1000)
    return torch.randint(low, high + 1, shape, generator=g, dtype=torch.int64).to(dtype)


def _raw(header: dict, payload: bytes) -> bytes:
    text = json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text + payload


# --- round trips ------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(ALLOWED_DTYPES))
def test_round_trip_every_allowed_dtype(name: str) -> None:
    x = _sample(ALLOWED_DTYPES[name])
    data = encode_tensor(x)
    assert isinstance(data, bytes)
    y = decode_tensor(data)
    assert y.dtype == x.dtype
    assert y.shape == x.shape
    assert torch.equal(y, x)


@pytest.mark.parametrize("name", sorted(ALLOWED_DTYPES))
@pytest.mark.parametrize("shape", [(), (0,), (1,), (2, 0, 3), (1, 1, 1, 1)])
def test_round_trip_odd_shapes(name: str, shape: tuple[int, ...]) -> None:
    x = _sample(ALLOWED_DTYPES[name], shape)
    y = decode_tensor(encode_tensor(x))
    assert y.dtype == x.dtype
    assert tuple(y.shape) == shape
    assert torch.equal(y, x)


@FAST
@given(shape=shapes, data=st.data())
def test_round_trip_float32_hypothesis(shape: tuple[int, ...], data: st.DataObject) -> None:
    n = 1
    for d in shape:
        n *= d
    values = data.draw(st.lists(
        st.floats(width=32, allow_nan=True, allow_infinity=True), min_size=n, max_size=n))
    x = torch.tensor(values, dtype=torch.float32).reshape(shape)
    y = decode_tensor(encode_tensor(x))
    assert y.dtype == torch.float32
    assert y.shape == x.shape
    # bitwise equality: NaN payloads, signed zeros and infinities survive
    assert torch.equal(y.view(torch.int32), x.view(torch.int32))


@FAST
@given(shape=shapes, data=st.data())
def test_round_trip_int64_hypothesis(shape: tuple[int, ...], data: st.DataObject) -> None:
    n = 1
    for d in shape:
        n *= d
    values = data.draw(st.lists(
        st.integers(min_value=-(2**63), max_value=2**63 - 1), min_size=n, max_size=n))
    x = torch.tensor(values, dtype=torch.int64).reshape(shape)
    y = decode_tensor(encode_tensor(x))
    assert y.dtype == torch.int64
    assert y.shape == x.shape
    assert y.reshape(-1).tolist() == values


def test_non_contiguous_and_grad_tensors_encode() -> None:
    x = torch.arange(12.0).reshape(3, 4).T
    assert not x.is_contiguous()
    assert torch.equal(decode_tensor(encode_tensor(x)), x)
    w = torch.ones(3, requires_grad=True) * 2
    y = decode_tensor(encode_tensor(w))
    assert not y.requires_grad
    assert torch.equal(y, torch.full((3,), 2.0))


def test_dtype_names_are_a_bijection() -> None:
    for name, dtype in ALLOWED_DTYPES.items():
        assert dtype_name(dtype) == name
        assert parse_dtype(name) == dtype
    assert len(DTYPE_NAMES) == len(ALLOWED_DTYPES)


@pytest.mark.parametrize("name", ["complex64", "float8", "object", "uint16", "", "torch.float32"])
def test_parse_dtype_refuses_unknown_names(name: str) -> None:
    with pytest.raises(InvalidRequest):
        parse_dtype(name)


# --- element limits ------------------------------------------------------------------------

def test_check_size() -> None:
    assert check_size((3, 4)) == 12
    assert check_size(()) == 1
    assert check_size((0, 10**12)) == 0
    assert check_size((10,), limit=10) == 10
    with pytest.raises(LimitExceeded, match="11"):
        check_size((11,), limit=10)
    with pytest.raises(LimitExceeded):
        check_size((MAX_ELEMENTS + 1,))


def test_encode_refuses_over_limit() -> None:
    x = torch.zeros(11)
    assert len(encode_tensor(torch.zeros(10), limit=10)) > 0
    with pytest.raises(LimitExceeded):
        encode_tensor(x, limit=10)
    with pytest.raises(LimitExceeded):
        encode_tensor(torch.zeros(4, 3), limit=11)


def test_decode_refuses_over_limit() -> None:
    data = encode_tensor(torch.zeros(4, 3))
    assert decode_tensor(data, limit=12).shape == (4, 3)
    with pytest.raises(LimitExceeded):
        decode_tensor(data, limit=11)


def test_decode_refuses_huge_header_before_allocating(monkeypatch: pytest.MonkeyPatch) -> None:
    """A header claiming 2**40 elements over 4 bytes of data is refused from the header alone."""
    data = _raw({"t": {"dtype": "F32", "shape": [2**20, 2**20], "data_offsets": [0, 4]}}, b"\0" * 4)

    def must_not_load(_data: bytes) -> dict:
        raise AssertionError("safetensors load was reached before the limit check")

    monkeypatch.setattr(codec, "load", must_not_load)
    with pytest.raises(LimitExceeded) as info:
        decode_tensor(data)
    assert str(2**40) in info.value.message


def test_decode_refuses_huge_shape_in_second_entry(monkeypatch: pytest.MonkeyPatch) -> None:
    data = _raw({
        "t": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
        "u": {"dtype": "U8", "shape": [MAX_ELEMENTS + 1], "data_offsets": [4, 5]},
    }, b"\0" * 5)
    monkeypatch.setattr(codec, "load", lambda _d: pytest.fail("load reached"))
    with pytest.raises(LimitExceeded):
        decode_tensor(data)


# --- malformed input ------------------------------------------------------------------------

@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x00" * 7,
        b"hello world, this is not a tensor",
        (10**9).to_bytes(8, "little") + b"{}",           # header longer than the data
        (100 * 1024).to_bytes(8, "little") + b"{" + b" " * (100 * 1024),  # header too long
        (5).to_bytes(8, "little") + b"{abc}",             # not JSON
        (2).to_bytes(8, "little") + b"[]",                # JSON, not an object
        (4).to_bytes(8, "little") + b"\xff\xfe\xfd\xfc",  # not UTF-8
        _raw({"t": {"dtype": "F32"}}, b""),               # no shape
        _raw({"t": {"dtype": "F32", "shape": ["a"], "data_offsets": [0, 4]}}, b"\0" * 4),
        _raw({"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4),   # short data
        _raw({"t": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 8),   # extra data
        _raw({"t": {"dtype": "XYZ", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4),   # bad dtype
        _raw({"t": {"dtype": "F32", "shape": [-1, 4], "data_offsets": [0, 4]}}, b"\0" * 4),
        _raw({}, b""),                                    # no tensor at all
    ],
)
def test_garbage_is_invalid_request(data: bytes) -> None:
    with pytest.raises(InvalidRequest):
        decode_tensor(data)


def test_random_bytes_never_escape_as_other_errors() -> None:
    g = torch.Generator().manual_seed(1)
    for n in (0, 1, 8, 9, 64, 512):
        data = bytes(torch.randint(0, 256, (n,), generator=g, dtype=torch.uint8).tolist())
        with pytest.raises(InvalidRequest):
            decode_tensor(data)


def test_truncated_valid_tensor_is_invalid_request() -> None:
    data = encode_tensor(torch.arange(10.0))
    for cut in (1, 8, len(data) // 2, len(data) - 1):
        with pytest.raises(InvalidRequest):
            decode_tensor(data[:cut])


def test_two_tensors_are_invalid_request() -> None:
    data = save({"t": torch.zeros(2), "u": torch.ones(2)})
    with pytest.raises(InvalidRequest, match="exactly one"):
        decode_tensor(data)


def test_wrongly_named_tensor_is_invalid_request() -> None:
    with pytest.raises(InvalidRequest):
        decode_tensor(save({"weights": torch.zeros(2)}))


def test_metadata_is_ignored() -> None:
    data = save({"t": torch.arange(3.0)}, metadata={"format": "pt"})
    assert decode_tensor(data).tolist() == [0.0, 1.0, 2.0]


@pytest.mark.parametrize("dtype", [torch.complex64, torch.uint16,
                                   torch.float8_e4m3fn])
def test_disallowed_dtype_is_invalid_request(dtype: torch.dtype) -> None:
    x = torch.zeros(2, dtype=dtype)
    with pytest.raises(InvalidRequest) as info:
        encode_tensor(x)
    assert not isinstance(info.value, LimitExceeded)
    with pytest.raises(InvalidRequest) as info:
        decode_tensor(save({"t": x}))
    assert str(dtype) in info.value.message
