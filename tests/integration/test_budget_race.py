"""64 concurrent DP queries of ε = 0.1 against a budget of 1.0, from several client
processes, on a node that runs four worker processes: exactly 10 succeed, the other 54 are
refused with BudgetExhausted, and the ledger sums to 1.0."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import numpy as np

from ops.local import LocalGrid
from protocol.errors import BudgetExhausted

CONFIG = """
[node]
id = "racer"
broker = "${GRIDQ_BROKER}"
store = "${GRIDQ_HOME}/racer"
identity = "${GRIDQ_HOME}/keys/racer.key"

[users.dana]
public_key_file = "${GRIDQ_HOME}/keys/dana.pub"

[worker]
concurrency = 4          # four processes check and charge the same budget at once

[budget]
default_epsilon = 1.0

[[datasets]]
name = "scores"
path = "${GRIDQ_HOME}/data/scores.npy"
tags = ["#race"]
allowed_users = []
bounds = [0.0, 100.0]
"""

CLIENTS, PER_CLIENT = 4, 16


def _client(args: tuple[str, str, str]) -> list[str]:
    """One data scientist's process: submit 16 DP queries at once, then collect them."""
    url, key, gateway = args
    from ops.keys import read_identity
    from orchestrator import Grid

    with Grid.connect(url, read_identity(key), timeout=120, gateway_key=gateway) as grid:
        scores = grid.search("#race")["racer"][0]
        tickets = [scores.mean().submit(epsilon=0.1) for _ in range(PER_CLIENT)]
        outcomes = []
        for ticket in tickets:
            try:
                ticket.private_value()
                outcomes.append("released")
            except BudgetExhausted:
                outcomes.append("exhausted")
        return outcomes


def test_concurrent_dp_queries_never_overspend(local_grid: LocalGrid):
    np.save(local_grid.home / "data" / "scores.npy", np.random.default_rng(1).uniform(0, 100, 500))
    local_grid.ensure_keys("dana", "racer")
    config = local_grid.home / "racer.toml"
    config.write_text(CONFIG)
    local_grid.start_node(config, "racer")
    local_grid.wait_ready(["racer"])
    try:
        client = (local_grid.url, str(Path(local_grid.keys) / "dana.key"), local_grid.gateway_key())
        with multiprocessing.get_context("spawn").Pool(CLIENTS) as pool:
            outcomes = [o for batch in pool.map(_client, [client] * CLIENTS) for o in batch]
        assert len(outcomes) == 64
        assert outcomes.count("released") == 10 and outcomes.count("exhausted") == 54
        with local_grid.connect("dana") as grid:
            (info,) = grid.budget("racer", "scores")
        assert info.releases == 10 and info.spent_epsilon == 1.0
    finally:
        local_grid.kill("racer")
