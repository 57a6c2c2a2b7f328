"""Differential privacy: accountant test vectors, noise of the stated scale, and automatic
sensitivity through plans."""

from __future__ import annotations

import math

import opendp.prelude as dp
import pytest
import torch

from protocol.dp import Charge, gaussian, gaussian_scale, laplace, rho_to_approx, spent
from protocol.errors import InvalidRequest, SensitivityUnknown
from protocol.plan import InputRef, Plan, Step, TensorSpec
from protocol.sensitivity import Analysis, Rows, analyse, declared


def test_ten_laplace_releases_of_a_tenth_compose_to_one() -> None:
    assert spent([Charge("laplace", 0.1, 0.0)] * 10, 1e-6) == (1.0, 0.0)


def test_gaussian_sigma_two_is_rho_one_eighth_and_converts_as_opendp_does() -> None:
    _, charge = gaussian(torch.zeros(1), l2=1.0, epsilon=1.0, delta=1e-6)  # any release, for its type
    space = dp.vector_domain(dp.atom_domain(T=float, nan=False), size=1), dp.l2_distance(T=float)
    measurement = dp.m.make_gaussian(*space, scale=2.0)
    assert measurement.map(1.0) == pytest.approx(0.125)
    library = dp.c.make_fix_delta(dp.c.make_zCDP_to_approxDP(measurement), 1e-6).map(1.0)[0]
    assert rho_to_approx(0.125, 1e-6) == pytest.approx(library, rel=1e-12)
    assert spent([Charge("gaussian", 0, 1e-6, rho=0.125)], 1e-6) == (pytest.approx(library, rel=1e-12), 1e-6)
    assert charge.rho > 0 and charge.scale == pytest.approx(gaussian_scale(1.0, 1.0, 1e-6))


def test_gaussian_scale_is_the_smallest_that_meets_epsilon() -> None:
    sigma = gaussian_scale(1.0, 1.0, 1e-6)
    assert rho_to_approx(1.0 / (2 * sigma**2), 1e-6) <= 1.0 + 1e-9
    assert rho_to_approx(1.0 / (2 * (0.99 * sigma) ** 2), 1e-6) > 1.0


def test_accounting_is_monotone_and_mixes_both_kinds() -> None:
    laplace_only = spent([Charge("laplace", 0.3, 0.0)], 1e-6)[0]
    both = spent([Charge("laplace", 0.3, 0.0), Charge("gaussian", 0.5, 1e-6, rho=0.01)], 1e-6)[0]
    more = spent([Charge("laplace", 0.3, 0.0), Charge("gaussian", 0.5, 1e-6, rho=0.02)], 1e-6)[0]
    assert laplace_only < both < more


# Noise: the released noise has the stated scale. OpenDP's sampler takes no seed, so these are
# statistical tests; each bound is ≥ 5.3 standard errors of a mean over N = 40 000 draws, so a
# correct sampler fails one with probability ≤ 1e-7 (normal approximation, which at this N is
# accurate far beyond that tail), well under the 1e-6 we allow.
N = 40_000


def test_each_mechanism_is_an_object_that_calibrates_costs_and_composes_by_its_rule() -> None:
    from protocol.dp import DP_SGD, GAUSSIAN, LAPLACE, MECHANISMS, Spend, calibrate, rdp_epsilon

    assert MECHANISMS == {"laplace": LAPLACE, "gaussian": GAUSSIAN, "dpsgd": DP_SGD}
    pure, approx = calibrate(2.0, 1.0, 0.5), calibrate(2.0, 1.0, 0.5, 1e-6)
    assert (pure.kind, pure.scale, pure.epsilon) == (LAPLACE, 4.0, pytest.approx(0.5))  # b = Δ₁/ε
    assert approx.kind is GAUSSIAN and approx.scale == pytest.approx(gaussian_scale(1.0, 0.5, 1e-6))
    assert (LAPLACE.metric, GAUSSIAN.metric) == ("l1", "l2")
    # DP-SGD's cost is Opacus' RDP accountant's ε, plus a pure-ε release made with it
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    accountant.history = [(1.1, 0.01, 500)]
    sgd = DP_SGD.cost(1.1, 0.01, 500, 1e-5, also_epsilon=0.25)
    assert sgd.kind is DP_SGD and sgd.delta == 1e-5
    assert sgd.epsilon == pytest.approx(accountant.get_epsilon(delta=1e-5) + 0.25, rel=1e-12)
    assert rdp_epsilon(1.1, 0.01, 500, 1e-5) == pytest.approx(sgd.epsilon - 0.25)
    with pytest.raises(InvalidRequest, match="dpsgd draws no noise here"):
        DP_SGD.noise(torch.zeros(3), sgd)
    # composition, rule by rule: Laplace ε add; DP-SGD ε and δ add; Gaussian ρ add, converted once
    spend = Spend()
    for charge in (pure, pure, sgd, approx, approx):
        charge.kind.compose(spend, charge)
    assert spend.epsilons == [pure.epsilon, pure.epsilon, sgd.epsilon] and spend.deltas == [1e-5]
    assert spend.rhos == [approx.rho, approx.rho]
    epsilon, delta = spend.at(1e-4)
    assert epsilon == pytest.approx(2 * pure.epsilon + sgd.epsilon + rho_to_approx(2 * approx.rho, 1e-4 - 1e-5))
    assert delta == 1e-4
    # a ledger's running total: DP-SGD's keeps the δ of its charges, the others take the budget's
    assert (DP_SGD.stored_delta(3e-5, 1e-4), GAUSSIAN.stored_delta(0.0, 1e-4), LAPLACE.stored_delta(0.0, 1e-4)) \
        == (3e-5, 1e-4, 1e-4)


def test_laplace_noise_has_the_stated_scale() -> None:
    noisy, charge = laplace(torch.zeros(N), l1=2.0, epsilon=0.5)
    b = 4.0
    assert charge.scale == b and charge.epsilon == pytest.approx(0.5)
    # |Laplace(b)| is exponential with mean b and standard deviation b
    assert abs(noisy.abs().mean().item() - b) <= 5.3 * b / math.sqrt(N)
    assert abs(noisy.mean().item()) <= 5.3 * math.sqrt(2) * b / math.sqrt(N)


def test_gaussian_noise_has_the_stated_scale() -> None:
    noisy, charge = gaussian(torch.zeros(N), l2=1.0, epsilon=1.0, delta=1e-6)
    sigma = charge.scale
    # the sample variance of N normals has standard error σ²·√(2/N)
    assert abs(noisy.pow(2).mean().item() - sigma**2) <= 5.3 * sigma**2 * math.sqrt(2 / N)
    assert abs(noisy.mean().item()) <= 5.3 * sigma / math.sqrt(N)


def test_bad_privacy_parameters_are_refused() -> None:
    with pytest.raises(InvalidRequest):
        laplace(torch.zeros(1), 1.0, 0.0)
    with pytest.raises(InvalidRequest):
        gaussian(torch.zeros(1), 1.0, 1.0, 0.0)


# --- sensitivity ------------------------------------------------------------------------------

BIRTHS = declared("b", 200, (2,), [(0.0, 7.0), (20.0, 65.0)])


def sensitivity(plan: Plan, inputs: list[Rows]) -> Analysis:
    return analyse(plan, inputs, [TensorSpec(shape=(r.n, *r.lo.shape), dtype="float64") for r in inputs])


def _plan(*steps: tuple) -> Plan:  # (op, args, params)
    return Plan(inputs=[InputRef(kind="dataset", name="b")],
                steps=[Step(op=op, args=args, params=params) for op, args, params in steps])


R = lambda i: {"ref": i}  # noqa: E731
C = lambda c: {"const": c}  # noqa: E731
COL = lambda j: {"index": [{}, j]}  # noqa: E731


def test_mean_of_a_column_moves_by_its_range_over_n() -> None:
    s = sensitivity(_plan(("getitem", [R(0)], COL(0)), ("mean", [R(1)], {})), [BIRTHS])
    assert s.l1 == pytest.approx(7.0 / 200) and s.size == 1


def test_column_sums_and_their_norms() -> None:
    s = sensitivity(_plan(("sum", [R(0)], {"dim": 0})), [BIRTHS])
    assert s.l1 == pytest.approx(7.0 + 45.0) and s.l2 == pytest.approx(math.hypot(7.0, 45.0)) and s.size == 2


def test_public_constants_scale_and_shift_rows_and_post_process_the_noisy_mean() -> None:
    s = sensitivity(_plan(("getitem", [R(0)], COL(1)), ("mul", [R(1), C(0.01)], {}), ("add", [R(2), C(3)], {}),
                          ("mean", [R(3)], {}), ("mul", [C(2.0), R(4)], {}), ("sub", [R(5), C(1)], {})), [BIRTHS])
    assert s.l1 == pytest.approx(0.45 / 200)  # the mean's: × 2 and − 1 apply to its noisy value
    assert s.post == {4, 5} and s.post_processed


def test_histogram_counts_move_by_one() -> None:
    s = sensitivity(_plan(("getitem", [R(0)], COL(0)), ("gt", [R(1), C(4.0)], {}), ("count", [R(2)], {})), [BIRTHS])
    assert s.l1 == pytest.approx(1.0)


def test_clamp_bounds_an_undeclared_column() -> None:
    unbounded = declared("b", 100, (2,), None)
    with pytest.raises(SensitivityUnknown, match="unbounded"):
        sensitivity(_plan(("sum", [R(0)], {"dim": 0})), [unbounded])
    s = sensitivity(_plan(("clamp", [R(0)], {"min": 0, "max": 10}), ("sum", [R(1)], {"dim": 0})), [unbounded])
    assert s.l1 == pytest.approx(20.0)


def test_ratios_of_aggregates_are_post_processing() -> None:
    s = sensitivity(_plan(("sum", [R(0)], {}), ("sum", [R(0)], {}), ("div", [R(1), R(2)], {})), [BIRTHS])
    assert s.l1 == pytest.approx(2 * (7.0 + 45.0)) and s.post == {2}  # one row reaches both sums


def test_differences_of_aggregates_add_their_sensitivities() -> None:
    s = sensitivity(_plan(("getitem", [R(0)], COL(0)), ("sum", [R(1)], {}),
                          ("getitem", [R(0)], COL(1)), ("sum", [R(3)], {}), ("sub", [R(4), R(2)], {})), [BIRTHS])
    assert s.l1 == pytest.approx(45.0 + 7.0)


@pytest.mark.parametrize("steps, named", [
    ([("getitem", [R(0)], COL(0)), ("getitem", [R(0)], COL(1)), ("matmul", [R(1), R(2)], {})], "matmul"),
    ([("getitem", [R(0)], COL(0)), ("max", [R(1)], {})], "max"),
    ([("getitem", [R(0)], COL(0)), ("std", [R(1)], {})], "std"),
    ([("getitem", [R(0)], {"index": [3]}), ("sum", [R(1)], {})], "single rows"),
    ([("getitem", [R(0)], COL(0))], "one value per row"),
])
def test_unbounded_plans_name_what_breaks_them(steps: list, named: str) -> None:
    with pytest.raises(SensitivityUnknown, match=named):
        sensitivity(_plan(*steps), [BIRTHS])
