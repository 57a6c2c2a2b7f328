"""Property tests of the MPC core for n = 2, 3, 4 parties: sharing round-trips exactly,
any n-1 shares look uniform, Beaver products and matrix products equal plaintext ring
arithmetic exactly, and decode to the real product within the fixed-point error bound."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.mpc import Dealer, FixedPoint, LocalChannel, expand, matmul, mul, reconstruct, share

PARTIES = st.sampled_from([2, 3, 4])
FP = FixedPoint(16)
reals = st.floats(min_value=-1000.0, max_value=1000.0, allow_nan=False, allow_infinity=False)


def tensors(max_len: int = 12) -> st.SearchStrategy[torch.Tensor]:
    return st.lists(reals, min_size=1, max_size=max_len).map(lambda v: torch.tensor(v, dtype=torch.float64))


@given(x=tensors(), n=PARTIES)
def test_reconstruct_of_share_is_exact(x: torch.Tensor, n: int) -> None:
    ring = FP.encode(x)
    shares = share(ring, n)
    assert len(shares) == n and all(s.dtype == torch.int64 for s in shares)
    assert torch.equal(reconstruct(shares), ring)


@given(x=tensors())
def test_encoding_error_is_at_most_half_an_ulp(x: torch.Tensor) -> None:
    assert (FP.decode(FP.encode(x)) - x).abs().max().item() <= 2.0 ** -(FP.frac_bits + 1)


def test_shares_of_a_secret_do_not_depend_on_it() -> None:
    # the same seeds give the same first n-1 shares whatever the secret: they carry nothing of it
    seeds = iter([bytes([i]) * 32 for i in range(6)])
    one = share(FP.encode(torch.tensor([1.0, 2.0])), 3, seed=lambda: next(seeds))
    seeds = iter([bytes([i]) * 32 for i in range(6)])
    other = share(FP.encode(torch.tensor([-7.0, 1e3])), 3, seed=lambda: next(seeds))
    assert torch.equal(one[0], other[0]) and torch.equal(one[1], other[1])
    assert not torch.equal(one[2], other[2])


def test_expanded_ring_elements_look_uniform() -> None:
    v = expand(b"\x01" * 32, (200_000,))
    # the top bit of a uniform int64 is a fair coin: 200k flips land within 5.3 σ of half w.p. ≥ 1 - 1e-7
    ones = (v < 0).sum().item()
    assert abs(ones - 100_000) <= 5.3 * (200_000 ** 0.5) / 2
    assert torch.equal(v, expand(b"\x01" * 32, (200_000,))) and not torch.equal(v, expand(b"\x02" * 32, (200_000,)))


@settings(max_examples=60)
@given(x=tensors(8), y=tensors(8), n=PARTIES)
def test_beaver_product_equals_plaintext(x: torch.Tensor, y: torch.Tensor, n: int) -> None:
    size = min(len(x), len(y))
    x, y = x[:size], y[:size]
    ex, ey = FP.encode(x), FP.encode(y)
    triples = [t.materialize() for t in Dealer(n).triple((size,), (size,), "mul")]
    channel = LocalChannel()
    z = mul(share(ex, n), share(ey, n), triples, channel)
    assert channel.rounds == 1
    assert torch.equal(reconstruct(z), ex * ey)  # exact in the ring
    # decoded at scale 2^2f: |x̃ỹ - xy| ≤ 2^-(f+1)(|x| + |y|) + 2^-(2f+2), the encoding errors' effect
    bound = 2.0 ** -(FP.frac_bits + 1) * (x.abs() + y.abs()) + 2.0 ** -(2 * FP.frac_bits + 2)
    assert ((FP.decode(reconstruct(z), scale_power=2) - x * y).abs() <= bound + 1e-9).all()


@settings(max_examples=30)
@given(m=st.integers(1, 5), k=st.integers(1, 6), p=st.integers(1, 4), n=PARTIES, data=st.data())
def test_beaver_matrix_product_equals_plaintext(m: int, k: int, p: int, n: int, data: st.DataObject) -> None:
    x = torch.tensor(data.draw(st.lists(reals, min_size=m * k, max_size=m * k)), dtype=torch.float64).reshape(m, k)
    y = torch.tensor(data.draw(st.lists(reals, min_size=k * p, max_size=k * p)), dtype=torch.float64).reshape(k, p)
    ex, ey = FP.encode(x), FP.encode(y)
    triples = [t.materialize() for t in Dealer(n).triple((m, k), (k, p), "matmul")]
    channel = LocalChannel()
    z = matmul(share(ex, n), share(ey, n), triples, channel)
    assert channel.rounds == 1
    assert torch.equal(reconstruct(z), ex @ ey)


@pytest.mark.parametrize("n", [2, 3, 4])
def test_the_dealer_sends_seeds_to_all_but_the_last_party(n: int) -> None:
    parts = Dealer(n).triple((1000,), (1000,))
    assert all(not p.fixed and len(p.seed) == 32 for p in parts[:-1])
    assert list(parts[-1].fixed) == ["c"]  # a and b are random for every party: only c is corrected
    assert all(p.nbytes == 32 for p in parts[:-1]) and parts[-1].nbytes == 32 + 8 * 1000
    full = [p.materialize() for p in parts]
    a, b, c = (reconstruct([t[name] for t in full]) for name in "abc")
    assert torch.equal(c, a * b)


def test_sharing_needs_two_parties_and_ring_values() -> None:
    with pytest.raises(ValueError):
        share(torch.zeros(2, dtype=torch.int64), 1)
    with pytest.raises(TypeError):
        share(torch.zeros(2), 2)
    with pytest.raises(ValueError, match="do not fit"):
        FP.encode(torch.tensor([2.0 ** 50]))


def test_round_messages_are_bound_to_their_key_and_place() -> None:
    from protocol.errors import BadSignature, InvalidRequest
    from protocol.mpc.wire import Deal, open_round, round_message, tag_round
    from protocol.serving import parse

    key, other = b"k" * 32, b"o" * 32
    parts = {"0": torch.arange(-3, 3, dtype=torch.int64).reshape(2, 3), "1": torch.tensor([True, False]),
             "2": torch.tensor([7, -1], dtype=torch.int64), "3": torch.empty((0, 4), dtype=torch.int64)}
    message = bytes(tag_round(key, "session:p0:up:3", round_message(parts, {"kind": "open"})))
    tensors, meta = open_round(key, "session:p0:up:3", message)
    assert meta == {"kind": "open"} and list(tensors) == list(parts)
    assert all(torch.equal(tensors[k], v) and tensors[k].dtype == v.dtype for k, v in parts.items())
    for k, label, m in ((other, "session:p0:up:3", message), (key, "session:p0:up:4", message),
                        (key, "session:p1:up:3", message), (key, "session:p0:up:3", b"X" + message[1:]),
                        (key, "session:p0:up:3", message[:-20] + message[-16:])):
        with pytest.raises(BadSignature):
            open_round(k, label, m)
    short = bytes(tag_round(key, "l", bytearray(message[:-24] + bytes(16))))  # tagged, yet cut short of its header
    with pytest.raises(InvalidRequest, match="round message l is not a round message"):
        open_round(key, "l", short)
    with pytest.raises(InvalidRequest, match="malformed Deal message: count"):
        parse(Deal, {"parties": ["a", "b"], "frac_bits": 16, "needs": [], "pools": [], "count": 10_000})


def test_a_message_cannot_name_any_broker_key_but_a_claim_check() -> None:
    from protocol.errors import InvalidRequest
    from protocol.mpc.wire import Aggregate
    from workers.storage.claims import take

    for key in ("gridq:gateway:identity", "gridq:mpc:pool:x", "celery", "gridq:blob:../../x"):
        with pytest.raises(InvalidRequest, match="not a claim-check key"):
            take(None, key)  # type: ignore[arg-type]  # refused before the broker is touched
    with pytest.raises(ValueError):
        Aggregate(round="ab" * 16, shares={"a": "gridq:gateway:identity", "b": "gridq:blob:" + "0" * 32})
