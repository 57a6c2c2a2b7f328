"""Property tests of truncation, comparison, ReLU and private inference for n = 2, 3, 4
parties. Truncation, comparison and ReLU are exact on ring values; fixed-point products
decode within the bound stated in ``protocol.mpc.nonlinear``; inference matches float64
torch within 1e-3."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.mpc import (
    Dealer,
    FixedPoint,
    LocalChannel,
    matmul,
    mul,
    non_negative,
    reconstruct,
    relu,
    run_local,
    share,
)
from protocol.mpc import truncate as truncate
from protocol.mpc.bits import unpack_bits
from protocol.mpc.model import Layer, ModelPlan, encode_parameters, infer
from protocol.mpc.nonlinear import greater_than_public, pack_bits
from protocol.mpc.ring import logical_rshift

PARTIES = st.sampled_from([2, 3, 4])
INT64 = st.integers(-(2 ** 63), 2 ** 63 - 1)
BELOW_OFFSET = st.integers(-(2 ** 62) + 1, 2 ** 62 - 1)


def ring_tensor(values: list[int]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64)


def material(parts: list) -> list[dict[str, torch.Tensor]]:  # type: ignore[type-arg]
    return [p.materialize() for p in parts]


def run(n: int, make, x: torch.Tensor, parts: list) -> tuple[torch.Tensor, int]:  # type: ignore[no-untyped-def, type-arg]
    channel = LocalChannel()
    out = run_local([make(i, s, t) for i, (s, t) in enumerate(zip(share(x, n), material(parts), strict=True))], channel)
    return reconstruct(out), channel.rounds


@settings(max_examples=60)
@given(values=st.lists(BELOW_OFFSET, min_size=1, max_size=16), f=st.integers(1, 30), n=PARTIES)
def test_truncation_is_the_floor_or_one_above_for_any_number_of_parties(values: list[int], f: int, n: int) -> None:
    x = ring_tensor(values + [2 ** 62 - 1, -(2 ** 62) + 1, 0, -1])
    got, rounds = run(n, lambda i, s, t: truncate(i, s, t, f), x, Dealer(n).trunc(tuple(x.shape), f))
    off = got - torch.div(x, 2 ** f, rounding_mode="floor")
    assert ((off == 0) | (off == 1)).all(), off  # never a wrap-around, whatever the shares
    assert rounds == 1


@settings(max_examples=60)
@given(values=st.lists(INT64, min_size=1, max_size=16), n=PARTIES)
def test_sign_and_relu_are_exact_over_the_whole_ring(values: list[int], n: int) -> None:
    x = ring_tensor(values + [0, -1, 1, -(2 ** 63), 2 ** 63 - 1])
    bits, rounds = run(n, non_negative, x, Dealer(n).relu(tuple(x.shape)))
    assert torch.equal(bits, (x >= 0).to(torch.int64)) and rounds == 8
    out, rounds = run(n, relu, x, Dealer(n).relu(tuple(x.shape)))
    assert torch.equal(out, x.clamp(min=0)) and rounds == 9


@settings(max_examples=40)
@given(pairs=st.lists(st.tuples(BELOW_OFFSET, BELOW_OFFSET), min_size=1, max_size=12), n=PARTIES)
def test_comparison_of_two_shared_values(pairs: list[tuple[int, int]], n: int) -> None:
    x, y = ring_tensor([p[0] for p in pairs]), ring_tensor([p[1] for p in pairs])
    channel = LocalChannel()
    parts = material(Dealer(n).relu(tuple(x.shape)))
    le = run_local([non_negative(i, yi - xi, t) for i, (xi, yi, t) in
                    enumerate(zip(share(x, n), share(y, n), parts, strict=True))], channel)
    assert torch.equal(reconstruct(le), (x <= y).to(torch.int64))


@settings(max_examples=40)
@given(words=st.lists(st.tuples(INT64, INT64), min_size=1, max_size=150), n=PARTIES)
def test_comparing_a_public_word_with_xor_shared_bits(words: list[tuple[int, int]], n: int) -> None:
    c, r = ring_tensor([w[0] for w in words]), ring_tensor([w[1] for w in words])
    xor_shares = [torch.randint(-(2 ** 63), 2 ** 63 - 1, r.shape, dtype=torch.int64) for _ in range(n - 1)]
    last = r.clone()
    for s in xor_shares:
        last ^= s
    parts = material(Dealer(n).relu(tuple(r.shape)))  # its comparison material fits any words of that shape
    channel = LocalChannel()
    out = run_local([greater_than_public(i, c, b, t) for i, (b, t) in enumerate(zip([*xor_shares, last], parts,
                                                                                    strict=True))], channel)
    packed = out[0]
    for b in out[1:]:
        packed = packed ^ b
    unsigned_greater = [int((rv % 2 ** 64) > (cv % 2 ** 64)) for cv, rv in words]
    assert unpack_bits(packed, len(words)).tolist() == unsigned_greater and channel.rounds == 6


@given(st.lists(st.integers(0, 1), min_size=1, max_size=200))
def test_packing_bits_round_trips(bits: list[int]) -> None:
    t = ring_tensor(bits)
    assert torch.equal(unpack_bits(pack_bits(t), len(bits)), t)


reals = st.floats(-100.0, 100.0, allow_nan=False)


@settings(max_examples=40)
@given(xy=st.lists(st.tuples(reals, reals), min_size=1, max_size=12), n=PARTIES)
def test_fixed_point_product_is_within_the_stated_bound(xy: list[tuple[float, float]], n: int) -> None:
    fp = FixedPoint(16)
    x = torch.tensor([p[0] for p in xy], dtype=torch.float64)
    y = torch.tensor([p[1] for p in xy], dtype=torch.float64)
    channel = LocalChannel()
    z = mul(share(fp.encode(x), n), share(fp.encode(y), n), material(Dealer(n).triple(tuple(x.shape), tuple(x.shape))),
            channel)
    parts = material(Dealer(n).trunc(tuple(x.shape), 16))
    z = run_local([truncate(i, s, t, 16) for i, (s, t) in enumerate(zip(z, parts, strict=True))], channel)
    eps = 2.0 ** -17
    bound = (x.abs() + y.abs()) * eps + eps ** 2 + 2 * eps
    assert ((fp.decode(reconstruct(z)) - x * y).abs() <= bound).all()


def plain(plan: ModelPlan, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    h = x
    for k, layer in enumerate(plan.layers):
        h = h @ params[f"{k}.weight"].T + params[f"{k}.bias"] if layer.kind == "linear" else h.clamp(min=0)
    return h


@pytest.mark.parametrize("n", [2, 3, 4])
@pytest.mark.parametrize("widths", [(4, 1), (6, 8, 3), (10, 16, 16, 2)])
def test_private_inference_equals_the_plaintext_model(n: int, widths: tuple[int, ...]) -> None:
    layers: list[Layer] = []
    for k, (a, b) in enumerate(zip(widths, widths[1:], strict=False)):
        layers += [Layer(kind="relu")] if k else []
        layers.append(Layer(kind="linear", in_features=a, out_features=b))
    plan = ModelPlan(layers=tuple(layers))
    plan.check()
    gen = torch.Generator().manual_seed(n * 100 + len(widths))
    params = {name: torch.randn(shape, generator=gen, dtype=torch.float64) for name, shape in
              ((f"{k}.{p}", (layer.out_features, layer.in_features) if p == "weight" else (layer.out_features,))
               for k, layer in enumerate(plan.layers) if layer.kind == "linear" for p in ("weight", "bias"))}
    x = torch.randn(5, widths[0], generator=gen, dtype=torch.float64)
    fp = FixedPoint(plan.frac_bits)
    dealer = Dealer(n)
    materials = [material(need.deal(dealer, plan.frac_bits)) for need in plan.material_needed(batch=5)]
    shared = {name: share(v, n) for name, v in encode_parameters(plan, params).items()}
    channel = LocalChannel()
    out = run_local([infer(i, plan, {k: v[i] for k, v in shared.items()}, xi, iter([m[i] for m in materials]))
                     for i, xi in enumerate(share(fp.encode(x), n))], channel)
    assert (fp.decode(reconstruct(out)) - plain(plan, params, x)).abs().max().item() < 1e-3
    assert channel.rounds == sum(2 if layer.kind == "linear" else 9 for layer in layers)


def test_a_plan_must_chain() -> None:
    with pytest.raises(ValueError, match="does not follow"):
        ModelPlan(layers=(Layer(kind="linear", in_features=4, out_features=3),
                          Layer(kind="linear", in_features=5, out_features=1))).check()
    with pytest.raises(ValueError, match="starts with a Linear"):
        ModelPlan(layers=(Layer(kind="relu"),)).check()


def test_logical_shift_ignores_the_sign() -> None:
    assert logical_rshift(torch.tensor([-1]), 60).item() == 15


@settings(max_examples=30)
@given(m=st.integers(1, 4), k=st.integers(1, 8), p=st.integers(1, 4), n=PARTIES, data=st.data())
def test_fixed_point_matrix_product_is_within_the_stated_bound(m: int, k: int, p: int, n: int,
                                                               data: st.DataObject) -> None:
    fp = FixedPoint(16)
    x = torch.tensor(data.draw(st.lists(reals, min_size=m * k, max_size=m * k)), dtype=torch.float64).reshape(m, k)
    y = torch.tensor(data.draw(st.lists(reals, min_size=k * p, max_size=k * p)), dtype=torch.float64).reshape(k, p)
    channel = LocalChannel()
    z = matmul(share(fp.encode(x), n), share(fp.encode(y), n), material(Dealer(n).triple((m, k), (k, p), "matmul")),
               channel)
    parts = material(Dealer(n).trunc((m, p), 16))
    z = run_local([truncate(i, s, t, 16) for i, (s, t) in enumerate(zip(z, parts, strict=True))], channel)
    eps = 2.0 ** -17
    # each of the k products errs by (|x|+|y|)·2^-(f+1) + 2^-(2f+2) from encoding; one truncation adds < 2^-f
    bound = (x.abs().sum(dim=1, keepdim=True) + y.abs().sum(dim=0, keepdim=True)) * eps + k * eps ** 2 + 2 * eps
    assert ((fp.decode(reconstruct(z)) - x @ y).abs() <= bound).all()
    assert channel.rounds == 2
