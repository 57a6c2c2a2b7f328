"""The HTTP edge (issue 17, parts 2 and 5) on a real grid: ``gridq edge`` as its own process in
front of the session's Redis, gateway and hospital node. A client that speaks only HTTP —
here the standard library's, with the scientist's key on the client side only — runs use case
1 through it and gets what the Python client gets; the replies it relays are the nodes' own,
verified by the client with keys it reads through the edge. Then hostile traffic: unsigned,
forged, replayed, expired, oversized, malformed and flooding requests are each refused with
the protocol's error code, and the edge keeps serving."""

from __future__ import annotations

import http.client as httplib
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import torch

from ops.edge.client import EdgeClient, EdgeError, signed_job
from ops.keys import read_identity
from ops.local import LocalGrid
from orchestrator.ticket import JobTicket
from protocol.contract import GATEWAY, MPC_MODELS_KEY, PUBLIC, Tasks, dead_letter_key
from protocol.envelope import MemoryNonceStore, open_envelope, seal_envelope
from protocol.identity import Identity, PublicIdentity
from protocol.listing import open_listing
from protocol.messages import BudgetQuery, GatewayReply, JobReply, RawRelease, RunJob, parse_body

pytestmark = pytest.mark.integration
TIGHT = ["--job-rate", "1", "--job-burst", "5", "--ip-rate", "1", "--ip-burst", "10", "--job-body-max", "4096",
         "--blob-body-max", "1024"]


@pytest.fixture(scope="module")
def edge(local_grid: LocalGrid) -> Iterator[str]:
    yield local_grid.start_edge()
    local_grid.kill("edge")


@pytest.fixture()
def http(edge: str) -> Iterator[EdgeClient]:
    with EdgeClient(edge) as client:
        yield client


def key(lg: LocalGrid, user: str) -> Identity:
    lg.ensure_keys(user)
    return read_identity(lg.keys / f"{user}.key")


def mean_job(lg: LocalGrid, user: str = "alice", **options: Any) -> dict[str, Any]:
    """A signed RUN_JOB for ``births["weight"].mean()``, built as the Python client builds it."""
    with lg.connect(user) as grid:
        births = grid.search("#birth-records", "#february")["hospital"][0]
        plan = births["weight"].mean().plan
    return signed_job(key(lg, user), "hospital", RunJob(plan=plan, release=RawRelease()), **options)


def refused(client: EdgeClient, status: int, code: str, method: str, path: str, payload: Any = None) -> None:
    got, answer = client.call(method, path, payload)
    assert (got, answer["error"]["code"]) == (status, code), answer
    assert set(answer) == {"error"} and set(answer["error"]) == {"code", "message"} and answer["error"]["message"]


# --- use case 1 through the edge ------------------------------------------------------------------

def test_use_case_1_through_the_edge_gives_what_the_python_client_gets(local_grid: LocalGrid, http: EdgeClient,
                                                                       births_feb: torch.Tensor) -> None:
    # what a client that holds nothing but its own key reads first: the gateway's key and node listing
    gateway = http.gateway()
    assert gateway["public_key"] == local_grid.gateway_key()
    gateway_key = PublicIdentity.parse(GATEWAY, gateway["public_key"])
    nodes = {n.node: n.public_key for n in open_listing(gateway["listing"], gateway_key, time.time()).nodes}
    hospital = PublicIdentity.parse("hospital", nodes["hospital"])

    request = mean_job(local_grid)
    status, accepted = http.call("POST", "/v1/jobs", request)
    assert status == 202 and accepted == {"job_id": request["envelope"]["job_id"], "queue": "node.hospital"}
    state, reply = http.reply(accepted["job_id"], wait=30)
    assert state == "SUCCESS"
    # the client verifies the node's reply with the node's key, and unseals the value with its own
    env = open_envelope(reply, recipient="alice", keyring={"hospital": hospital}, nonces=MemoryNonceStore(),
                        delivery_id=accepted["job_id"], now=time.time(), job_id=accepted["job_id"])
    body = parse_body(env.body_json())
    assert isinstance(body, JobReply) and body.status == "done" and body.value is not None
    with local_grid.connect("alice") as grid:
        value = JobTicket.finished(grid, accepted["job_id"], state, reply).value()
        births = grid.search("#birth-records", "#february")["hospital"][0]
        assert torch.equal(value, births["weight"].mean().get())  # the Python client's answer
    assert value.item() == births_feb[:, 0].mean().item()
    assert http.reply(accepted["job_id"]) == (state, reply)  # read again, at once (wait=0)
    encoded = accepted["job_id"].replace(":", "%3A")  # as a browser's encodeURIComponent sends it
    assert http.call("GET", f"/v1/jobs/{encoded}?wait=1") == (200, {"state": state, "reply": reply,
                                                                   "cancel_mark": "started"})  # the node took it up


def test_a_refusal_is_the_node_s_signed_answer_relayed(local_grid: LocalGrid, http: EdgeClient) -> None:
    request = mean_job(local_grid, "carol")  # carol may compute, not see the value
    state, reply = http.reply(http.submit(request), wait=30)
    assert state == "SUCCESS"  # the node answered: with its signed refusal
    with local_grid.connect("carol") as grid:
        env = grid.transport.verify(reply, "hospital", request["envelope"]["job_id"])
    body = parse_body(env.body_json())
    assert isinstance(body, JobReply) and body.status == "denied" and body.value is None
    assert body.error is not None and body.error.code == "permission_denied"
    budget = signed_job(key(local_grid, "carol"), "hospital", BudgetQuery(dataset="birth-records-feb"))
    job_id = http.submit(budget)
    status, answer = http.call("GET", f"/v1/jobs/{job_id}?wait=0")
    assert status == 200 and answer["state"] in ("PENDING", "STARTED", "SUCCESS")
    assert (answer["reply"] is None) == (answer["state"] != "SUCCESS")


def test_search_models_and_blobs_through_the_edge(local_grid: LocalGrid, http: EdgeClient) -> None:
    job_id, reply = http.search(["#birth-records", "#february"])
    gateway = PublicIdentity.parse(GATEWAY, local_grid.gateway_key())
    env = open_envelope(reply, recipient=PUBLIC, keyring={GATEWAY: gateway}, nonces=MemoryNonceStore(),
                        delivery_id=job_id, now=time.time(), job_id=job_id)
    found = parse_body(env.body_json())
    assert isinstance(found, GatewayReply) and found.error is None
    with local_grid.connect("alice") as grid:  # what the Python client finds
        direct = {(node, ptr.name) for node, ptrs in grid.search("#birth-records", "#february").items() for ptr in ptrs}
    assert {(m.node, m.name) for m in found.datasets} == direct and ("hospital", "birth-records-feb") in direct
    refused(http, 400, "invalid_request", "POST", "/v1/search", {"tags": "#not-a-list"})

    card = {"card": "signed by its owner and its host", "n": 1}
    with redis.Redis.from_url(local_grid.url) as admin:
        admin.hset(MPC_MODELS_KEY, "edge-test/model", json.dumps(card))
        try:
            models = http.models()
            assert models["edge-test/model"] == card
            assert set(models) == {k.decode() for k in admin.hkeys(MPC_MODELS_KEY)}
        finally:
            admin.hdel(MPC_MODELS_KEY, "edge-test/model")

    data = bytes(range(256)) * 40
    status, _, raw = http.raw("POST", "/v1/blobs", data, {"Content-Type": "application/octet-stream"})
    blob = json.loads(raw)["key"]
    assert status == 200 and blob.startswith("gridq:blob:")
    with redis.Redis.from_url(local_grid.url) as admin:
        assert 0 < admin.ttl(blob) <= 3600  # a claim-check blob always expires
    status, headers, got = http.raw("GET", f"/v1/blobs/{blob}")
    assert (status, got, headers["content-type"]) == (200, data, "application/octet-stream")
    refused(http, 404, "not_found", "GET", f"/v1/blobs/{blob}")  # taken once
    blob = json.loads(http.raw("POST", "/v1/blobs", b"\x00" * 10)[2])["key"]
    assert http.raw("GET", f"/v1/blobs/{blob.replace(':', '%3A')}")[::2] == (200, b"\x00" * 10)
    assert http.call("GET", "/healthz") == (200, {"ok": True})


def test_a_search_runs_under_the_client_s_job_id_so_its_reply_is_bound_to_the_question(local_grid: LocalGrid,
                                                                                       http: EdgeClient) -> None:
    """POST /v1/search?job_id=ID: the edge sends the gateway's task under the client's fresh id, so
    the gateway's signed reply names it (as Transport.ask_gateway's do): a relay cannot answer with
    the reply to another search. An id is taken once; a job's id cannot be taken over."""
    gateway = PublicIdentity.parse(GATEWAY, local_grid.gateway_key())
    query = {"tags": ["#birth-records", "#february"], "words": []}
    job_id = uuid.uuid4().hex
    status, answer = http.call("POST", f"/v1/search?job_id={job_id}", query)
    assert status == 200 and answer["job_id"] == job_id, answer
    env = open_envelope(answer["reply"], recipient=PUBLIC, keyring={GATEWAY: gateway}, nonces=MemoryNonceStore(),
                        delivery_id=job_id, now=time.time(), job_id=job_id)  # signed for the client's id
    found = parse_body(env.body_json())
    assert isinstance(found, GatewayReply) and ("hospital", "birth-records-feb") in {(m.node, m.name)
                                                                                    for m in found.datasets}
    refused(http, 409, "replayed_nonce", "POST", f"/v1/search?job_id={job_id}", query)  # each id once
    # a job's id: the gateway's reply is not stored over the node's
    request = mean_job(local_grid)
    sent = http.submit(request)
    state, reply = http.reply(sent, wait=30)
    refused(http, 409, "replayed_nonce", "POST", f"/v1/search?job_id={sent.replace(':', '%3A')}", query)
    assert http.reply(sent) == (state, reply) and reply["sender"] == "hospital"
    for bad in ("", "a/b", "x" * 81, "hospital:..%2Fx", "%00"):  # not ids a worker takes, or a URL names
        refused(http, 400, "invalid_request", "POST", f"/v1/search?job_id={bad}", query)
    other, _ = http.search(["#birth-records"])  # without one, the edge picks a fresh id, as before
    assert other != job_id and len(other) == 32


def test_concurrent_long_polls_each_wake_with_their_own_reply(local_grid: LocalGrid, edge: str) -> None:
    """Eight clients at once, each waiting on jobs (pairs of them on the same job): one pub/sub
    connection at the edge wakes each wait with its own job's reply (bounded: 12 jobs)."""
    from concurrent.futures import ThreadPoolExecutor

    shared = [mean_job(local_grid) for _ in range(4)]  # each sent by one client, waited on by two
    own = [mean_job(local_grid) for _ in range(8)]

    def client(i: int) -> list[str]:
        with EdgeClient(edge) as mine:
            job_id = shared[i // 2]["envelope"]["job_id"]
            if i % 2 == 0:
                mine.submit(shared[i // 2])
            for _ in range(200):  # the other of the pair may not have sent it yet: NotFound until then
                try:
                    state, reply = mine.reply(job_id, wait=30)
                    break
                except EdgeError as exc:
                    assert exc.status == 404
                    time.sleep(0.05)
            assert reply["job_id"] == job_id and reply["recipient"] == "alice"
            return [state, mine.reply(mine.submit(own[i]), wait=30)[0]]

    with ThreadPoolExecutor(8) as pool:
        states = list(pool.map(client, range(8)))
    assert states == [["SUCCESS", "SUCCESS"]] * 8


# --- hostile traffic --------------------------------------------------------------------------------

def test_hostile_envelopes_are_refused_with_the_protocol_s_codes(local_grid: LocalGrid, http: EdgeClient) -> None:
    admin = redis.Redis.from_url(local_grid.url)
    dead = admin.llen(dead_letter_key("node.hospital"))
    good = mean_job(local_grid)
    env = good["envelope"]
    intruder = Identity.generate("intruder")  # not admitted: no intruder.pub among the edge's users (no test makes one)
    forged = signed_job(intruder, "hospital", RunJob.model_validate(json.loads(env["body"])))
    forged["envelope"]["sender"] = "alice"
    cases: list[tuple[int, str, Any]] = [
        (401, "bad_signature", {**good, "envelope": {**env, "signature": ""}}),  # unsigned
        (401, "bad_signature", {**good, "envelope": {**env, "signature": env["signature"][:-4] + "AAA="}}),
        (401, "bad_signature", forged),  # signed by another key, as alice
        (401, "bad_signature", {**good, "envelope": {**env, "recipient": "clinic"}}),  # tampered
        (401, "unknown_sender", signed_job(intruder, "hospital", RunJob.model_validate(json.loads(env["body"])))),
        (401, "expired", mean_job(local_grid, ttl=1.0)),
        (400, "invalid_request", mean_job(local_grid, job_id="hospital/../x")),  # no URL could name it
        (400, "invalid_request", {"task": Tasks.RUN_JOB, "envelope": {**env, "issued_at": "now"}}),
        (400, "invalid_request", {"task": Tasks.RUN_JOB, "envelope": [env]}),
        (400, "invalid_request", {"task": 7, "envelope": env}),
        (400, "invalid_request", {"task": Tasks.RUN_JOB}),
        (400, "invalid_request", {"task": "celery.chord_unlock", "envelope": env}),
        (403, "permission_denied", {"task": Tasks.MPC_STORE, "envelope": env}),  # nodes send it, not clients
        (403, "permission_denied", {"task": Tasks.REGISTER, "envelope": env}),
        (400, "invalid_request", [1, 2, 3]),
        (400, "invalid_request", "a string"),
    ]
    time.sleep(1.1)  # the ttl=1 s envelope has expired
    for status, code, payload in cases:
        refused(http, status, code, "POST", "/v1/jobs", payload)
    future = seal_envelope(key(local_grid, "alice"), recipient="hospital", kind="run",
                           job_id=f"hospital:{uuid.uuid4().hex}", body=json.loads(env["body"]),
                           now=time.time() + 3600).model_dump(mode="json")
    refused(http, 401, "expired", "POST", "/v1/jobs", {"task": Tasks.RUN_JOB, "envelope": future})
    nowhere = signed_job(key(local_grid, "alice"), "nowhere", RunJob.model_validate(json.loads(env["body"])))
    refused(http, 503, "node_unavailable", "POST", "/v1/jobs", nowhere)  # no worker: it would only wait
    for body in (b"{not json", b"\xff\xfe\x00", b"[" * 50_000 + b"]" * 50_000, b""):
        status, _, raw = http.raw("POST", "/v1/jobs", body, {"Content-Type": "application/json"})
        assert (status, json.loads(raw)["error"]["code"]) == (400, "invalid_request"), raw[:200]

    # replayed: the same envelope twice, then a new envelope under a job id already sent
    assert http.submit(good) == env["job_id"]
    refused(http, 409, "replayed_nonce", "POST", "/v1/jobs", good)
    again = mean_job(local_grid, job_id=env["job_id"])
    refused(http, 409, "replayed_nonce", "POST", "/v1/jobs", again)
    assert http.reply(env["job_id"], wait=30)[0] == "SUCCESS"  # the one that went through ran once

    refused(http, 404, "not_found", "GET", f"/v1/jobs/hospital:{uuid.uuid4().hex}?wait=5")  # at once, not in 5 s
    refused(http, 400, "invalid_request", "GET", f"/v1/jobs/{env['job_id']}?wait=soon")
    for bad in ("gridq:sent:" + env["job_id"], "gridq:gateway:identity", "celery-task-meta-x", "gridq:blob:*"):
        refused(http, 400, "invalid_request", "GET", f"/v1/blobs/{bad}")
    refused(http, 404, "not_found", "GET", f"/v1/blobs/gridq:blob:{uuid.uuid4().hex}")
    refused(http, 404, "not_found", "GET", "/v1/nothing-here")
    refused(http, 405, "invalid_request", "DELETE", "/v1/jobs")
    assert http.call("GET", "/healthz") == (200, {"ok": True})
    assert admin.llen(dead_letter_key("node.hospital")) == dead  # nothing refused reached the node's queue
    admin.close()


def test_oversized_bodies_are_refused_before_and_while_reading(http: EdgeClient, edge: str) -> None:
    big = json.dumps({"task": Tasks.RUN_JOB, "envelope": {"body": "x" * (1 << 20)}}).encode()
    status, _, raw = http.raw("POST", "/v1/jobs", big, {"Content-Type": "application/json"})
    assert (status, json.loads(raw)["error"]["code"]) == (413, "limit_exceeded")
    host, port = edge.removeprefix("http://").split(":")
    conn = httplib.HTTPConnection(host, int(port), timeout=30)  # chunked: no Content-Length to refuse it by
    try:
        conn.request("POST", "/v1/jobs", body=iter([b"[" * 65536] * 17), headers={"Content-Type": "application/json"},
                     encode_chunked=True)
        answer = conn.getresponse()
        assert (answer.status, json.loads(answer.read())["error"]["code"]) == (413, "limit_exceeded")
    finally:
        conn.close()
    assert http.call("GET", "/healthz") == (200, {"ok": True})


def test_floods_are_limited_per_identity_and_the_edge_keeps_serving(local_grid: LocalGrid, http: EdgeClient,
                                                                     tmp_path: Path) -> None:
    (tmp_path / "index.html").write_text("<h1>gridq</h1>")  # a browser page, served with the API (--static)
    tight = local_grid.start_edge(None, *TIGHT, "--static", str(tmp_path), name="edge-tight")
    try:
        with EdgeClient(tight) as client:
            assert client.raw("GET", "/")[::2] == (200, b"<h1>gridq</h1>")
            refused(client, 404, "not_found", "GET", "/missing.js")
            status, _, raw = client.raw("POST", "/v1/blobs", b"x" * 2048)  # over this edge's 1 KiB blob limit
            assert (status, json.loads(raw)["error"]["code"]) == (413, "limit_exceeded")
            request = mean_job(local_grid)
            answers = [client.call("POST", "/v1/jobs", request) for _ in range(12)]  # bounded: 12 requests
            codes = [(s, a.get("error", {}).get("code")) for s, a in answers]
            assert codes[0] == (202, None)  # the first goes through, replays are refused (409) …
            assert set(codes[1:5]) == {(409, "replayed_nonce")}
            assert (429, "limit_exceeded") in codes[5:]  # … and past the sender's burst of 5, 429
            status, headers, _ = client.raw("POST", "/v1/jobs", json.dumps(request).encode())
            assert status == 429 and float(headers["retry-after"]) >= 1
            # another sender is not held back by alice's flood …
            assert client.submit(mean_job(local_grid, "bob")).startswith("hospital:")
            # … and refusals before a sender is known count against the client's address
            stranger = signed_job(Identity.generate("intruder"), "hospital", BudgetQuery())
            statuses = [client.call("POST", "/v1/jobs", stranger)[0] for _ in range(15)]
            assert statuses[0] == 401 and 429 in statuses
            flood = [client.call("GET", "/v1/models")[0] for _ in range(15)]
            assert flood.count(429) >= 13  # the address's bucket is empty (refilled at 1 a second)
            unknown = {"cancellation": "cancel intruder " + "A" * 86 + "=="}  # refused before its signer is known
            assert client.call("POST", f"/v1/jobs/{request['envelope']['job_id']}/cancel", unknown)[0] == 429
            assert client.call("GET", "/healthz") == (200, {"ok": True})
            assert local_grid.procs["edge-tight"].poll() is None
    finally:
        local_grid.kill("edge-tight")
    # the main edge still serves, and a valid job still works
    assert http.call("GET", "/healthz") == (200, {"ok": True})
    request = mean_job(local_grid)
    assert http.reply(http.submit(request), wait=30)[0] == "SUCCESS"
    assert local_grid.procs["edge"].poll() is None


def test_a_replay_is_refused_by_an_edge_process_started_after_it_was_accepted(local_grid: LocalGrid,
                                                                                http: EdgeClient) -> None:
    """Nonces and sent job ids are kept in Redis, not in an edge's memory: several edge
    processes agree, and one that restarts forgets nothing."""
    request = mean_job(local_grid)
    assert http.submit(request) == request["envelope"]["job_id"]
    other = local_grid.start_edge(None, name="edge-other")  # a second process, started after the first accepted it
    try:
        with EdgeClient(other) as client:
            refused(client, 409, "replayed_nonce", "POST", "/v1/jobs", request)
            assert client.reply(request["envelope"]["job_id"], wait=30)[0] == "SUCCESS"  # any edge relays the reply
    finally:
        local_grid.kill("edge-other")
    with pytest.raises(EdgeError) as caught:
        http.submit(request)
    assert caught.value.status == 409 and caught.value.error.code == "replayed_nonce"
