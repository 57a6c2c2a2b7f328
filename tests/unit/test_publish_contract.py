"""Publishing is a contract (issue 14, points 2 and 4): every value lies within the declared
bounds (or is clamped to them, recorded, on the owner's word); the stored file is checked
again when a job loads it; a name is replaced only on purpose, keeping what the ledger
charged; and a CSV's decimals stay the numbers their owner wrote. A real node from a TOML
config, its SQLite store in a temporary folder, jobs served in this process: no broker."""

from __future__ import annotations

import base64
import json
import logging
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from protocol.codec import decode_tensor
from protocol.contract import Tasks
from protocol.dp import Charge
from protocol.envelope import MemoryNonceStore, open_envelope, seal_envelope
from protocol.errors import InvalidRequest, JobFailed, NotFound
from protocol.identity import Identity
from protocol.messages import JobReply, RawRelease, RunJob
from protocol.plan import InputRef, Plan, Ref, Step, TensorSpec
from workers.config import load_config
from workers.node import Node
from workers.policy.ledger import Ledger

ALICE, BOB = Identity.generate("alice"), Identity.generate("bob")
CONFIG = """
[node]
id = "lab"
broker = "redis://127.0.0.1:1/0"   # never reached: nothing here talks to a broker
store = "store"
identity = "lab.key"

[users.alice]
public_key = "{alice}"
[users.bob]
public_key = "{bob}"
"""


def _config(tmp_path: Path, datasets: str = "") -> Path:
    (tmp_path / "lab.key").write_text(Identity.generate("lab").to_json())
    (tmp_path / "lab.key").chmod(0o600)  # a secret key others may read is refused, as ssh refuses one
    path = tmp_path / "lab.toml"
    path.write_text(CONFIG.format(alice=ALICE.public.text(), bob=BOB.public.text()) + datasets)
    return path


def _offline_node(config: Path) -> Node:
    """The node of ``config``, without a broker: no job it takes up was cancelled (its
    cancel key, on the broker, is taken as first: ``Node._take_up``)."""
    made = Node.from_config(config)
    made._take_up = lambda job_id: None  # type: ignore[method-assign]
    return made


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    made = _offline_node(_config(tmp_path))
    yield made
    made.close()


def _csv(path: Path, header: str, rows: list[str]) -> Path:
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


def _run(node: Node, dataset: str, op: str = "sum", job_id: str = "lab:job-1") -> JobReply:
    """A job of alice's (an allowed user) on ``dataset``, served by the node's runner."""
    plan = Plan(inputs=[InputRef(kind="dataset", name=dataset)], steps=[Step(op=op, args=[Ref(ref=0)], params={})])
    body = RunJob(plan=plan, release=RawRelease())
    env = seal_envelope(ALICE, recipient="lab", kind=body.kind, job_id=job_id, body=body.model_dump(mode="json"),
                        now=time.time())
    answer = node.runner().answer(Tasks.RUN_JOB, env.model_dump(mode="json"), job_id)
    opened = open_envelope(answer.signed, recipient="alice", keyring={"lab": node.identity.public},
                           nonces=MemoryNonceStore(), delivery_id="d", now=time.time())
    return JobReply.model_validate(opened.body_json())


def _value(reply: JobReply) -> torch.Tensor:
    assert reply.status == "done" and reply.value is not None and reply.value.sealed is not None, reply
    return decode_tensor(ALICE.unseal(base64.b64decode(reply.value.sealed)))


# --- 1. bounds are checked at publish --------------------------------------------------------

def _attack() -> torch.Tensor:
    """201 values declared in [0, 0.5]: in-bound, their sum is at most 100.5; one of them is 998.5."""
    return torch.cat([torch.full((200, 1), 0.5, dtype=torch.float64), torch.tensor([[998.5]], dtype=torch.float64)])


def test_values_outside_the_bounds_are_refused_naming_column_count_and_ranges(node: Node) -> None:
    with pytest.raises(InvalidRequest) as refused:
        node.publish("attack", _attack(), columns=["x"], bounds={"x": (0.0, 0.5)}, allowed_users=["alice"],
                     notify=False)
    message = refused.value.message
    assert "column 'x': 1 value outside the declared [0, 0.5] (values seen: 0.5 to 998.5)" in message
    assert "clamp=True" in message and "fix the bounds" in message
    assert node.datasets() == [] and node.publications() == []  # nothing was stored


def test_clamped_data_cannot_exceed_n_times_the_upper_bound_and_the_clamp_is_recorded_privately(
        node: Node, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="workers.node"):
        meta = node.publish("attack", _attack(), columns=["x"], bounds={"x": (0.0, 0.5)}, allowed_users=["alice"],
                            clamp=True, notify=False)
    assert _value(_run(node, "attack")).item() == 201 * 0.5  # 100.5, not 1098.5
    (record,) = node.publications("attack")
    assert (record.rows, record.clamped, record.replaced, record.dtype) == (201, 1, False, "float64")
    assert "attack: 1 value(s) outside the declared bounds clamped" in caplog.text
    # the public metadata says nothing about what was clamped
    assert set(meta.model_dump()) == {"node", "name", "shape", "dtype", "columns", "description", "tags", "bounds"}
    assert "clamp" not in json.dumps(meta.model_dump(mode="json"))


def test_one_pair_bounds_every_value_and_a_whole_table_is_checked(node: Node) -> None:
    table = torch.zeros(3, 4)
    table[2, 3] = -1.0
    with pytest.raises(InvalidRequest, match=r"every value: 1 value outside the declared \[0, 1\] "
                                             r"\(values seen: -1 to 0\)"):
        node.publish("grid", table, bounds=(0.0, 1.0), notify=False)
    with pytest.raises(InvalidRequest, match=r"column 'b': 2 values outside the declared \[0, 10\]"):
        node.publish("two", torch.tensor([[1.0, 11.0], [2.0, 12.0]]), columns=["a", "b"],
                     bounds={"a": (0.0, 10.0), "b": (0.0, 10.0)}, notify=False)


def test_nan_is_outside_every_bound_and_is_refused_even_with_clamp(node: Node, tmp_path: Path) -> None:
    data = _csv(tmp_path / "gaps.csv", "weight,height", ["3.1,50", "nan,51", "3.4,52"])
    for clamp in (False, True):
        with pytest.raises(InvalidRequest) as refused:
            node.publish("gaps", data, bounds={"weight": (0.0, 7.0), "height": (20.0, 65.0)}, clamp=clamp,
                         notify=False)
        message = refused.value.message
        assert "column 'weight': 1 value outside the declared [0, 7] (1 of them NaN)" in message
        assert "cannot place" in message and "Remove or fill" in message
        assert "height" not in message  # the column that keeps its contract is not named
    with pytest.raises(InvalidRequest, match="column 'weight': 1; 1 NaN"):  # nor without bounds (issue 16)
        node.publish("gaps", data, notify=False)


def test_clamp_needs_bounds_and_a_dtype_that_holds_them(node: Node) -> None:
    with pytest.raises(InvalidRequest, match="none are declared"):
        node.publish("free", torch.ones(3), clamp=True, notify=False)
    with pytest.raises(InvalidRequest, match="int64 still fall outside"):  # no integer is 0.5
        node.publish("counts", torch.tensor([0, 1, 2]), bounds=(0.5, 2.0), clamp=True, notify=False)


def test_the_config_declares_clamp_and_dtype(tmp_path: Path) -> None:
    _csv(tmp_path / "w.csv", "weight", ["3.14", "9.5"])
    config = _config(tmp_path, """
[[datasets]]
name = "w"
path = "w.csv"
bounds = { weight = [0.0, 7.0] }
allowed_users = ["alice"]
clamp = true
dtype = "float32"
""")
    node = _offline_node(config)
    try:
        (meta,) = node.load_config_datasets()
        assert meta.dtype == "float32" and meta.bounds == [(0.0, 7.0)]
        assert _value(_run(node, "w", "max")).item() == 7.0
        assert node.publications("w")[0].clamped == 1
    finally:
        node.close()


def test_the_config_refuses_a_dtype_the_codec_does_not_carry(tmp_path: Path) -> None:
    config = _config(tmp_path, '[[datasets]]\nname = "w"\npath = "w.csv"\ndtype = "complex64"\n')
    with pytest.raises(InvalidRequest, match=r"datasets\.0\.dtype.*'complex64' is not allowed; use one of"):
        load_config(config)


# --- 2. the stored file is checked again when a job loads it ---------------------------------

def test_a_stored_file_changed_after_publish_is_refused_to_every_job(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    config = _config(tmp_path)
    node = _offline_node(config)
    node.publish("births", torch.tensor([[3.0, 50.0], [3.5, 52.0]], dtype=torch.float64), columns=["w", "h"],
                 bounds={"w": (0.0, 7.0), "h": (20.0, 65.0)}, allowed_users=["alice"], notify=False)
    assert _value(_run(node, "births")).item() == 108.5
    file = node.store.dataset_row("births").file
    node.close()
    save_file({"data": torch.tensor([[3.0, 50.0], [1000.0, 52.0]], dtype=torch.float64)}, file)

    node = _offline_node(config)  # a new Store: nothing cached
    try:
        with caplog.at_level(logging.ERROR, logger="workers.storage.store"):
            reply = _run(node, "births", job_id="lab:job-2")
        assert reply.status == "failed" and reply.error is not None and reply.error.code == JobFailed.code
        message = reply.error.message
        assert "'births'" in message and "its owner must publish it again" in message
        assert not re.search(r"\d", message), message  # no value, count or range reaches the scientist
        assert "column 'w': 1 value outside the declared [0, 7] (values seen: 3 to 1000)" in caplog.text
        with pytest.raises(JobFailed):  # refused again, for every job, until the owner publishes again
            node.store.dataset("births")
    finally:
        node.close()


def test_a_stored_file_of_another_shape_or_dtype_is_refused(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    config = _config(tmp_path)
    node = _offline_node(config)
    node.publish("plain", torch.arange(6.0).reshape(3, 2), notify=False)  # no bounds: shape and dtype still hold
    file = node.store.dataset_row("plain").file
    node.close()
    for changed in (torch.arange(8.0).reshape(4, 2), torch.arange(6, dtype=torch.float64).reshape(3, 2)):
        save_file({"data": changed}, file)
        node = _offline_node(config)
        try:
            with caplog.at_level(logging.ERROR, logger="workers.storage.store"), \
                    pytest.raises(JobFailed, match="'plain'"):
                node.store.dataset("plain")
        finally:
            node.close()
    assert "it was published as (3, 2) float32" in caplog.text


def test_a_dataset_is_verified_once_per_version_and_a_replacement_is_read_anew(node: Node) -> None:
    node.publish("d", torch.ones(4, 2), bounds=(0.0, 1.0), notify=False)
    _, first = node.store.dataset("d")
    assert node.store.dataset("d")[1] is first  # cached: not read nor checked again
    node.publish("d", torch.zeros(5, 2), bounds=(0.0, 1.0), replace=True, notify=False)
    assert node.store.dataset("d")[1].shape == (5, 2)


def test_a_job_reads_a_dataset_with_who_may_see_it_raw_in_one_look(node: Node) -> None:
    node.publish("d", torch.ones(4, 2), bounds=(0.0, 1.0), allowed_users=["bob"], notify=False)
    node.store.begin_job("lab:access-1", "carol")
    node.store.allow("d", "carol", "lab:access-1")  # an approved access request
    row, values, users = node.store.job_input("d")
    assert (row.name, users) == ("d", ["bob", "carol"]) == ("d", node.store.allowed_users("d"))
    assert values is node.store.dataset("d")[1]  # the same checked, cached values
    with pytest.raises(NotFound, match="no dataset 'gone' on this node"):
        node.store.job_input("gone")


# --- 3. a name is replaced only on purpose ---------------------------------------------------

def test_publishing_a_name_again_is_refused_unless_replaced(node: Node) -> None:
    node.publish("d", torch.ones(3, 1), notify=False)
    with pytest.raises(InvalidRequest, match=r"'d' is already published; publish\(\.\.\., replace=True\) replaces "
                                             "its data and its policy together: give tags, allowed users and "
                                             "bounds again"):
        node.publish("d", torch.zeros(3, 1), notify=False)
    assert torch.equal(node.store.dataset("d")[1], torch.ones(3, 1))  # the first publication stands


def test_replace_sets_data_and_policy_anew_and_keeps_the_ledger(node: Node) -> None:
    node.publish("births", torch.ones(4, 2), columns=["w", "h"], bounds={"w": (0.0, 7.0), "h": (0.0, 65.0)},
                 description="first", tags=["#one"], allowed_users=["alice", "bob"], mock=torch.zeros(2, 2),
                 notify=False)
    ledger = Ledger(node.store, "lab", node.config.budget)
    node.store.begin_job("lab:dp-1", "carol")
    ledger.charge_with_reply("lab:dp-1", "carol", ["births"], Charge("laplace", 0.3, 0.0), "done", {})

    meta = node.publish("births", torch.full((6, 2), 2.0), columns=["w", "h"], description="second",
                        tags=["#two"], replace=True, notify=False)
    row, values = node.store.dataset("births")
    assert torch.equal(values, torch.full((6, 2), 2.0))
    assert (meta.description, meta.tags, meta.bounds, meta.shape) == ("second", ["#two"], None, (6, 2))
    assert row.allowed_users == [] and node.store.mock("births") is None
    info = ledger.info("carol", "births")
    assert info.spent_epsilon == pytest.approx(0.3) and info.releases == 1  # charged before, still counted
    assert [p.replaced for p in node.publications("births")] == [False, True]
    stored = sorted(p.name for p in (node.store.folder / "datasets").iterdir())
    assert stored == [Path(row.file).name]  # the replaced version's files are gone


def test_the_config_replaces_at_every_start(tmp_path: Path) -> None:
    _csv(tmp_path / "w.csv", "weight", ["3.5", "4.0"])
    config = _config(tmp_path, '[[datasets]]\nname = "w"\npath = "w.csv"\ntags = ["#w"]\n')
    for _ in range(2):  # a node started twice on the same store
        node = _offline_node(config)
        try:
            node.load_config_datasets()
        finally:
            node.close()
    node = _offline_node(config)
    try:
        assert [p.replaced for p in node.publications("w")] == [False, True]
    finally:
        node.close()


# --- 4. data fidelity: a CSV's decimals stay the numbers written -----------------------------

def test_a_csv_loads_as_float64_and_its_mean_is_exact(node: Node, tmp_path: Path) -> None:
    data = _csv(tmp_path / "pi.csv", "x", ["3.14", "3.14"])
    meta = node.publish("pi", data, allowed_users=["alice"], notify=False)
    assert meta.dtype == "float64"
    assert _value(_run(node, "pi", "mean")).item() == 3.14


def test_a_declared_dtype_is_the_owners_choice(node: Node, tmp_path: Path) -> None:
    data = _csv(tmp_path / "pi.csv", "x", ["3.14", "3.14"])
    twin = _csv(tmp_path / "twin.csv", "x", ["1.5"])
    meta = node.publish("pi32", data, dtype="float32", mock=twin, allowed_users=["alice"], notify=False)
    assert meta.dtype == "float32" and node.store.mock("pi32").dtype == torch.float32  # the twin follows
    assert _value(_run(node, "pi32", "mean")).item() == torch.tensor(3.14, dtype=torch.float32).item() != 3.14
    with pytest.raises(InvalidRequest, match="'complex64' is not allowed; use one of"):
        node.publish("bad", data, dtype="complex64", notify=False)
    with pytest.raises(InvalidRequest, match="NaN or infinite values, which int64 cannot hold"):
        node.publish("gaps", torch.tensor([1.0, float("nan")]), dtype="int64", notify=False)


def test_search_results_show_the_dtype() -> None:
    from orchestrator.pointer import DataPointer
    from protocol.messages import DatasetMeta

    meta = DatasetMeta(node="lab", name="pi", shape=(2, 1), dtype="float64", columns=["x"], tags=["#pi"])
    pointer = DataPointer(None, "lab", InputRef(kind="dataset", name="pi"),  # type: ignore[arg-type]
                          TensorSpec(shape=meta.shape, dtype=meta.dtype), meta)
    assert pointer.dtype == "float64"
    assert repr(pointer) == "<DataPointer lab/pi shape=(2, 1) float64 #pi>"


# --- issue 16, part 5: what enters at publish is checked there ------------------------------


@pytest.mark.parametrize("bad, seen", [(float("nan"), "1 NaN, 0 infinite"), (float("inf"), "0 NaN, 1 infinite")])
def test_nan_or_infinity_in_a_table_without_bounds_is_refused_naming_the_column(node: Node, bad: float,
                                                                                 seen: str) -> None:
    """Without bounds nothing else would stop it: every sum, mean or model of the table
    would be NaN or infinite. (With bounds, NaN was refused already and clamp=True clamps
    an infinity.)"""
    table = torch.tensor([[3.0, 50.0], [bad, 51.0]], dtype=torch.float64)
    with pytest.raises(InvalidRequest, match=rf"column 'w': 1; {seen}\).*Remove or fill the missing values"):
        node.publish("holes", table, columns=["w", "h"], notify=False)
    assert node.datasets() == []
    clamped = node.publish("holes", table.nan_to_num(nan=3.0), columns=["w", "h"], bounds=(0.0, 65.0), clamp=True,
                           notify=False)
    assert clamped.shape == (2, 2) and node.publications("holes")[0].clamped == (1 if bad == float("inf") else 0)


def test_a_tag_without_its_hash_is_an_invalid_request_naming_the_fix(node: Node) -> None:
    with pytest.raises(InvalidRequest, match="tags start with '#', e.g. '#birth-records'"):
        node.publish("births", torch.ones(2, 1), tags=["births"], notify=False)


def test_allowed_users_must_be_users_of_the_node(node: Node) -> None:
    """A misspelt name would let no one in, silently; the fix is in the message."""
    with pytest.raises(NotFound, match=r"allowed_users of 'births': 'alcie' is not a user of node 'lab' \(its "
                                       r"users: alice, bob\)\. Check the spelling, or add \[users\.NAME\]"):
        node.publish("births", torch.ones(2, 1), allowed_users=["alice", "alcie"], notify=False)
    assert node.datasets() == []


def test_budget_set_refuses_a_user_the_node_does_not_know(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from ops.cli import app

    config = _config(tmp_path)
    owner = _offline_node(config)
    owner.publish("births", torch.ones(2, 1), notify=False)
    owner.close()
    runner = CliRunner()
    refused = runner.invoke(app, ["budget", "set", str(config), "carl", "births", "--epsilon", "5"])
    assert refused.exit_code == 1
    assert "NotFound: budget set: 'carl' is not a user of node 'lab'" in refused.output
    done = runner.invoke(app, ["budget", "set", str(config), "bob", "births", "--epsilon", "5"])
    assert done.exit_code == 0, done.output
    shown = runner.invoke(app, ["budget", "show", str(config)], env={"COLUMNS": "200"})
    assert "carl" not in shown.output and "bob" in shown.output
