"""A node's training and evaluation figures are sealed to the requester: only its key opens
them, every set of figures seals to the same length, and the wire schema stays strict."""

from __future__ import annotations

import base64

import pytest

from protocol.errors import BadSignature, InvalidRequest
from protocol.identity import Identity
from protocol.messages import JobReply, SealedMetrics, TrainMetrics, parse_body

ALICE = Identity.generate("alice")


def test_only_the_requester_opens_the_figures():
    figures = TrainMetrics(samples=898, loss=0.4321, accuracy=0.875, seconds=1.5, epsilon=0.3)
    sealed = figures.sealed_to(ALICE.public)
    assert sealed.open(ALICE, "hospital:1") == figures
    assert "0.4321" not in sealed.model_dump_json() and "loss" not in sealed.model_dump_json()
    with pytest.raises(BadSignature):
        sealed.open(Identity.generate("bob"))


def test_every_set_of_figures_seals_to_one_length():
    small = TrainMetrics(samples=0, loss=0.0)
    large = TrainMetrics(samples=10**12, loss=-1.2345678901234567e-300, accuracy=0.123456789012345,
                         seconds=12345.678901234, epsilon=98.76543210987654)
    assert len(small.sealed_to(ALICE.public).sealed) == len(large.sealed_to(ALICE.public).sealed)


def test_a_reply_carries_sealed_figures_only():
    sealed = TrainMetrics(samples=3, loss=1.0).sealed_to(ALICE.public)
    reply = parse_body({"kind": "job_reply", "status": "done", "metrics": sealed.model_dump()})
    assert isinstance(reply, JobReply) and reply.metrics == sealed
    for metrics in ({"samples": 3, "loss": 1.0},  # plaintext figures are not a reply any more
                    {"sealed": sealed.sealed, "loss": 1.0},  # nothing beside the ciphertext
                    {"sealed": "not base64!"}, {"sealed": "A" * 2048}, {"sealed": ""}):
        with pytest.raises(InvalidRequest, match="malformed message: job_reply.metrics"):
            parse_body({"kind": "job_reply", "status": "done", "metrics": metrics})


def test_what_is_sealed_must_be_figures():
    for plain in (b"not json", b'{"samples": -1, "loss": 1.0}', b'{"samples": 1, "loss": 1.0, "x": 2}'):
        sealed = SealedMetrics(sealed=base64.b64encode(ALICE.public.seal(plain)).decode())
        with pytest.raises(InvalidRequest, match="malformed sealed metrics") as raised:
            sealed.open(ALICE, "hospital:2")
        assert raised.value.job_id == "hospital:2"
    with pytest.raises(InvalidRequest, match="not valid base64"):
        SealedMetrics(sealed="QUJDR").open(ALICE)


def test_withheld_figures_seal_to_the_same_length_and_say_why():
    withheld = TrainMetrics(samples=10**12, epsilon=98.76543210987654, withheld="x" * 240)
    assert withheld.loss is None and withheld.accuracy is None
    sealed = withheld.sealed_to(ALICE.public)
    assert sealed.open(ALICE) == withheld
    assert len(sealed.sealed) == len(TrainMetrics(samples=0, loss=0.0).sealed_to(ALICE.public).sealed)
