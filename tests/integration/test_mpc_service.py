"""Encrypted ML-as-a-service end to end, on real Redis and real MPC worker processes: the
company hosts the plan, hospital and public clusters (and the clinic, for 3 parties) hold
shares, the university deals correlated randomness. Nobody but the querier sees x or y."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time

import pytest
import redis
import torch
from sqlalchemy import create_engine, select
from test_broker_capture import Monitor, found_in

from ops.local import NODE_CONFIGS, LocalGrid, free_port
from protocol.contract import mpc_query_key
from protocol.errors import NodeUnavailable, PermissionDenied, UnknownSender
from protocol.mpc.ring import FixedPoint
from workers.storage.tables import MpcShareRow

ROUND_TIMEOUT = 10.0  # company.toml's [mpc] round_timeout


@pytest.fixture(scope="module")
def mpc_grid(demo_mpc_pool: LocalGrid) -> LocalGrid:
    """The demo pool: company hosts, hospital, public and clinic hold shares, university deals."""
    return demo_mpc_pool


def seed_model() -> torch.nn.Linear:
    """The seed's example: one linear layer whose weights and bias are set in advance."""
    model = torch.nn.Linear(4, 2)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.5, -1.25, 2.0, 0.1], [-0.3, 0.7, 0.05, -2.5]]))
        model.bias.copy_(torch.tensor([0.25, -0.5]))
    return model


def mlp() -> torch.nn.Sequential:
    torch.manual_seed(7)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))


def test_the_seed_example_equals_the_plaintext_model(mpc_grid: LocalGrid) -> None:
    model = seed_model()
    x = torch.tensor([[1.0, 2.0, -0.5, 3.0], [-1.5, 0.25, 4.0, -2.0]])
    with mpc_grid.connect("dana") as owner:
        card = owner.serve(model, name="seed-linear", parties=["hospital", "public"], crypto_provider="university",
                           host="company", queriers=["bob"])
        assert card.plan.in_features == 4 and card.owner == "dana"
    with mpc_grid.connect("bob") as grid:
        listed = {c.name: c for c in grid.models()}
        assert listed["seed-linear"].parties == ["hospital", "public"]
        assert listed["seed-linear"].provider == "university"
        y = grid.query("seed-linear", x)
        with torch.no_grad():
            expected = model(x)
        assert y.shape == expected.shape
        assert (y - expected).abs().max().item() < 1e-3
        one = grid.query("seed-linear", x[0])  # a single row works too, and the warm pool serves it
        assert (one - expected[0]).abs().max().item() < 1e-3


def test_a_two_layer_mlp_over_three_parties(mpc_grid: LocalGrid) -> None:
    model = mlp()
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(3))
    with mpc_grid.connect("dana") as owner:
        owner.serve(model, name="mlp3", parties=["hospital", "public", "clinic"], crypto_provider="university",
                    host="company", queriers=["bob"])
    with mpc_grid.connect("bob") as grid:
        y = grid.query("mlp3", x)
    with torch.no_grad():
        assert (y - model(x)).abs().max().item() < 1e-3


def test_only_the_owners_queriers_may_query(mpc_grid: LocalGrid) -> None:
    with mpc_grid.connect("dana") as owner:
        owner.serve(seed_model(), name="bob-only", parties=["hospital", "public"], crypto_provider="university",
                    host="company", queriers=["bob"])
    with mpc_grid.connect("eve") as grid:  # a user the company knows, not a querier of this model
        with pytest.raises(PermissionDenied, match="may not query model 'bob-only'"):
            grid.query("bob-only", torch.zeros(4))
    with mpc_grid.connect("mallory") as grid:  # nobody the company knows
        with pytest.raises(UnknownSender):
            grid.query("bob-only", torch.zeros(4))


def test_serving_refuses_a_dealer_that_holds_shares_and_layers_it_cannot_run(mpc_grid: LocalGrid) -> None:
    from protocol.errors import ForbiddenOperation, InvalidRequest

    with mpc_grid.connect("dana") as owner:
        with pytest.raises(InvalidRequest, match="crypto provider 'university' cannot also hold shares"):
            owner.serve(seed_model(), name="bad", parties=["hospital", "university"], crypto_provider="university",
                        host="company")
        with pytest.raises(ForbiddenOperation, match="Sigmoid"):
            owner.serve(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Sigmoid()), name="bad",
                        parties=["hospital", "public"], crypto_provider="university", host="company")


def test_no_weight_share_input_or_output_crosses_the_broker_unsealed(mpc_grid: LocalGrid) -> None:
    model = seed_model()
    x = torch.tensor([[0.75, -1.5, 2.25, 1.0]])
    fp = FixedPoint(16)
    monitor = Monitor(mpc_grid.url)
    try:
        with mpc_grid.connect("dana") as owner:
            owner.serve(model, name="captured", parties=["hospital", "public"], crypto_provider="university",
                        host="company", queriers=["bob"])
        with mpc_grid.connect("bob") as grid:
            y = grid.query("captured", x)
    finally:
        commands = monitor.stop()
    pushed = mpc_query_key("company").encode()  # the query's one message, on the host's list
    assert any(len(c) > 1 and c[0].upper() == b"RPUSH" and c[1] == pushed for c in commands), "no query seen"
    patterns: list[bytes] = []
    for t in (model.weight.detach(), model.bias.detach(), x, y):
        patterns += [struct.pack("<f", float(v)) + struct.pack("<f", float(w))
                     for v, w in zip(t.flatten()[:-1], t.flatten()[1:], strict=True)]  # adjacent float32 pairs
        patterns += [fp.encode(t.flatten()[i:i + 2].to(torch.float64)).numpy().tobytes()
                     for i in range(max(1, t.numel() - 1))]  # their ring encodings, 16 bytes each
    for party in ("hospital", "public"):  # each party's stored share of the weight: 16-byte windows
        engine = create_engine(f"sqlite:///{mpc_grid.home / party / 'node.db'}")
        with engine.connect() as conn:
            data = conn.execute(select(MpcShareRow.data).where(MpcShareRow.model == "captured")).scalar_one()
        engine.dispose()
        body = data[-96:]  # the tensors' bytes end the safetensors file
        patterns += [body[i:i + 16] for i in range(0, len(body) - 16, 8)]
    assert found_in(commands, patterns) == []


def test_a_killed_party_fails_the_query_within_the_round_timeout(mpc_grid: LocalGrid) -> None:
    with mpc_grid.connect("dana") as owner:
        owner.serve(seed_model(), name="fragile", parties=["hospital", "public"], crypto_provider="university",
                    host="company", queriers=["bob"])
    mpc_grid.kill("public-mpc")
    try:
        with mpc_grid.connect("bob") as grid:
            started = time.monotonic()
            with pytest.raises(NodeUnavailable, match="party 'public' did not answer"):
                grid.query("fragile", torch.ones(4))
            assert time.monotonic() - started < ROUND_TIMEOUT + 5
    finally:
        mpc_grid.start_mpc(NODE_CONFIGS / "public.toml")
        mpc_grid.wait_ready(["public"], workers=["public-mpc"])


def test_a_model_name_is_its_owners(mpc_grid: LocalGrid) -> None:
    with mpc_grid.connect("dana") as owner:
        owner.serve(seed_model(), name="dana-only", parties=["hospital", "public"], crypto_provider="university",
                    host="company")
    with mpc_grid.connect("eve") as grid, pytest.raises(PermissionDenied, match="belongs to 'dana'"):
        grid.serve(seed_model(), name="dana-only", parties=["hospital", "public"], crypto_provider="university",
                   host="company")


def test_hostile_messages_get_typed_errors_and_the_pool_goes_on(mpc_grid: LocalGrid) -> None:
    from orchestrator.mpc import answer, ask, find, signed_query
    from protocol.contract import Tasks, mpc_queue
    from protocol.errors import InvalidRequest
    from protocol.mpc.sharing import share
    from protocol.mpc.wire import QueryModel, UserKeys

    with mpc_grid.connect("dana") as owner:
        owner.serve(seed_model(), name="sturdy", parties=["hospital", "public"], crypto_provider="university",
                    host="company", queriers=["bob"])
    with mpc_grid.connect("bob") as grid:
        for junk in ({"v": "1.0", "sender": "bob"}, "not an envelope", {"v": "9.0"}):
            raw = grid.app.send_task(Tasks.MPC_QUERY, args=[junk], queue=mpc_queue("company")).get(timeout=30)
            assert '"error":{"code":' in raw["body"]  # signed, typed refusal
        # the same on the host's query list (the hot path): junk is dropped, another kind refused
        broker = redis.Redis.from_url(grid.transport.url)  # as the scientists' broker user
        for item in (b"not json", b"[]", json.dumps({"v": "1.0", "sender": "bob"}).encode()):
            broker.rpush(mpc_query_key("company"), item)
        broker.close()
        with pytest.raises(InvalidRequest, match="does not take 'mpc_keys' messages here; it takes mpc_query"):
            answer(grid, grid.transport.push("company", mpc_queue("company"), mpc_query_key("company"),
                                             UserKeys(names=["bob"])))
        # input shares of one row, under a query that claims two: the parties refuse at once
        card = find(grid, "sturdy")
        signed, inputs = signed_query(grid, card, share(FixedPoint(16).encode(torch.zeros(1, 4)), 2))
        signed = signed.sign(grid.identity, signed.query.model_copy(update={"batch": 2}))
        started = time.monotonic()
        with pytest.raises(InvalidRequest, match="must be int64 of shape \\(2, 4\\)"):
            ask(grid, "company", Tasks.MPC_QUERY, QueryModel(query=signed, inputs=inputs))
        assert time.monotonic() - started < ROUND_TIMEOUT
        y = grid.query("sturdy", torch.ones(4))  # and the pool goes on serving
    assert (y - seed_model()(torch.ones(4))).abs().max().item() < 1e-3


def test_a_host_bug_reaches_the_querier_at_once_as_job_failed(mpc_grid: LocalGrid) -> None:
    """A fault the grid has no type for (here: the host's own record of a model, damaged on
    disk) is answered at once as JobFailed pointing to the host's log — not left to the
    querier's timeout — and the host goes on serving its other models."""
    from protocol.errors import JobFailed
    from workers.storage.tables import MpcModelRow

    with mpc_grid.connect("dana") as owner:
        for name in ("damaged", "intact"):
            owner.serve(seed_model(), name=name, parties=["hospital", "public"], crypto_provider="university",
                        host="company", queriers=["bob"])
    engine = create_engine(f"sqlite:///{mpc_grid.home / 'company' / 'node.db'}")
    with engine.begin() as conn:
        conn.execute(MpcModelRow.__table__.update().where(MpcModelRow.name == "damaged").values(card={"name": 1}))
    engine.dispose()
    with mpc_grid.connect("bob") as grid:
        started = time.monotonic()
        with pytest.raises(JobFailed, match="failed at 'company' \\(ValidationError\\); its owner's log"):
            grid.query("damaged", torch.ones(4))
        assert time.monotonic() - started < ROUND_TIMEOUT
        y = grid.query("intact", torch.ones(4))
    assert (y - seed_model()(torch.ones(4))).abs().max().item() < 1e-3


def test_flower_shows_a_query_the_host_popped_from_its_list(mpc_grid: LocalGrid, poll_json) -> None:  # type: ignore[no-untyped-def]
    """A query is no Celery task on the hot path, but the operator still sees it in Flower:
    the host tells Flower of it as a worker does of a task, with its outcome and no value."""
    port = free_port()
    flower = subprocess.Popen([sys.executable, "-m", "ops.cli", "flower", "--broker", mpc_grid.url, "--port",
                               str(port)], env={**os.environ, "FLOWER_UNAUTHENTICATED_API": "true"},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        poll_json(f"http://127.0.0.1:{port}/api/workers?refresh=1",
                  lambda w: any(k.startswith("company-mpc@") for k in w), timeout=30)
        with mpc_grid.connect("dana") as owner:
            owner.serve(seed_model(), name="watched", parties=["hospital", "public"], crypto_provider="university",
                        host="company", queriers=["bob"])
        with mpc_grid.connect("bob") as grid:
            grid.query("watched", torch.ones(4))
        # what Flower's task list draws from: received, succeeded, then the outcome the host announced
        listed = poll_json(f"http://127.0.0.1:{port}/tasks/datatable?draw=1&start=0&length=100&search%5Bvalue%5D="
                           "&order%5B0%5D%5Bcolumn%5D=0&order%5B0%5D%5Bdir%5D=desc&columns%5B0%5D%5Bdata%5D=received",
                           lambda t: any(v.get("name") == "gridq.mpc.query" and v.get("result") == "answered"
                                         for v in t["data"]), timeout=30)
        (seen,) = [v for v in listed["data"] if v.get("name") == "gridq.mpc.query"]
        assert seen["state"] == "SUCCESS" and seen["worker"].startswith("company-mpc@")
        assert "signature" not in json.dumps(seen)  # no envelope shown, let alone a share
    finally:
        flower.terminate()
        flower.wait(timeout=15)
