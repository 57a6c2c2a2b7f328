"""The MPC pool: a node's worker for encrypted ML-as-a-service (``gridq mpc start CONFIG``).

One ``gridq mpc start`` per node, with two pools: ``mpc.<node>`` for its users' requests
(host, aggregation party) and ``mpc-peer.<node>`` for other nodes' MPC workers (party,
crypto provider). A host waits on its parties and its dealer, on lists they fill; with one
pool for both, two nodes hosting for each other would each wait on work queued behind the
other's wait. Each role has a module (:mod:`workers.mpc.worker` routes the messages):

* **host** — keeps served models' cards (structure, parties, who may query: no numbers),
  and coordinates queries: it takes dealer bundles from its pool, pushes a session on each
  party's session list (:mod:`workers.mpc.lists`: no Celery task a party) and waits for
  their answers (output shares sealed to the querier): it sees no round;
* **party** — keeps its shares of served models in its own database, and computes its side
  of each round (:func:`protocol.mpc.model.infer`, the same code as the tests run),
  exchanging its masked parts with the other parties directly (:mod:`workers.mpc.rounds`);
* **aggregation party** — adds up its shares of a federated round's updates (each signed
  by its node) and sends the sum, sealed, to the scientist: once per round;
* **crypto provider** — deals bundles (triples, truncation and comparison material) from
  shapes alone, each party's part sealed to it and signed, into the host's pool lists.

What a party does with a model is its owner's to decide, not the host's: the party pins the
card its owner signed when it stores its share (under owner and model name; only a newer
card signed by the same key replaces it), and runs a session only from that card's host,
for a query signed by a querier the card allows, whose input shares are signed for that
query (:mod:`protocol.mpc.cards`).

Rounds travel party to party on per-session pub/sub channels, tagged with a key the host
sealed to each party. A party whose peer does not answer within the ``round_timeout`` gives
up and says so: the query fails with ``NodeUnavailable``, naming the silent party.
Host, parties and provider must be distinct nodes: a dealer that is also a party or the
host could unmask.
"""

from workers.mpc.worker import MpcWorker, mpc_tasks

__all__ = ["MpcWorker", "mpc_tasks"]
