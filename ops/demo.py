"""``gridq demo`` and ``gridq up``: a whole grid on this machine, and the three use cases
run against it as their users would, step by step: private statistics, federated learning
and encrypted ML-as-a-service."""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.markup import escape

from ops.demo_data import digits_split, write_demo_data
from ops.local import NODE_CONFIGS, LocalGrid, kept_broker_port, port_free
from orchestrator.history import figure
from protocol.errors import InvalidRequest, PermissionDenied
from workers.storage.datasets import load_table

USERS = ("alice", "bob", "ana", "carol", "dana", "eve")
MPC_NODES = ("company", "university", "hospital", "public")  # host, crypto provider, two share holders
MPC_ONLY = ("company", "university", "public")  # nodes that run only an MPC worker
console = Console()


def prepare(home: Path) -> list[Path]:
    """Keys for every demo participant (kept if they exist), the demo data, and the demo node
    configs in ``home/nodes`` (where ``gridq requests list hospital`` finds them); returns the
    configs of the two data-owning nodes."""
    lg = LocalGrid(home)
    lg.ensure_keys("gateway", "hospital", "clinic", *MPC_ONLY, *USERS)
    (home / "nodes").mkdir(parents=True, exist_ok=True)
    for config in NODE_CONFIGS.glob("*.toml"):
        if not (home / "nodes" / config.name).exists():  # an owner's edits survive
            shutil.copy(config, home / "nodes" / config.name)
    write_demo_data(home / "data")
    shards, (x_test, y_test) = digits_split(2)
    for node, shard in zip(("hospital", "clinic"), shards, strict=True):
        np.save(home / "data" / f"{node}_digits.npy", shard)
    np.save(home / "data" / "digits_test.npy", np.column_stack([x_test, y_test]).astype(np.float32))
    return [home / "nodes" / "hospital.toml", home / "nodes" / "clinic.toml"]


def step(text: str) -> None:
    console.print(f"\n[bold cyan]▶ {text}[/]")


def private_statistics(lg: LocalGrid) -> None:
    """The first use case: publish → search → remote statistics → release only if allowed."""
    step("carol connects to the grid and searches for #birth-records #february")
    with lg.connect("carol") as grid:
        found = grid.search("#birth-records", "#february")
        for node, pointers in found.items():
            for p in pointers:
                console.print(f"  {node}: {p!r}")
        births = found["hospital"][0]
        step("carol reads the metadata of the hospital's dataset (nothing else leaves the node)")
        console.print(f"  shape={births.shape} dtype={births.dtype} columns={list(births.columns)}")
        console.print(f"  description={births.description!r} tags={list(births.tags)}")
        step("carol tries births.get()")
        try:
            births.get()
        except PermissionDenied as exc:
            console.print(f"  [red]refused:[/] PermissionDenied: {exc}")
        step("carol computes the sum and the mean of each column remotely (results stay at the hospital)")
        sums = births.sum(dim=0).submit()
        means = births.mean(dim=0).submit()
        console.print(f"  tickets: {sums.id} → {sums.wait().status}, {means.id} → {means.wait().status}")
        pointer = means.result()
        console.print(f"  result pointer: {pointer!r}")
        step("carol tries to get the mean: she is not an allowed user of the dataset")
        try:
            pointer.get()
        except PermissionDenied as exc:
            console.print(f"  [red]refused:[/] PermissionDenied: {exc}")
    step("alice, an allowed user, asks for the average weight and height")
    with lg.connect("alice") as grid:
        births = grid.search("#birth-records", "#february")["hospital"][0]
        t0 = time.perf_counter()
        weight = births["weight"].mean().get()
        height = births["height"].mean().get()
        ms = (time.perf_counter() - t0) * 1000
        console.print(f"  average weight {weight.item():.4f} kg, average height {height.item():.4f} cm "
                      f"(two jobs, {ms:.0f} ms)")
    table, _ = load_table(lg.home / "data" / "hospital_births_feb.csv")
    local = table.mean(dim=0)
    same = bool(local[0] == weight and local[1] == height)
    console.print(f"  the hospital computes locally: {local[0]:.4f} kg, {local[1]:.4f} cm  "
                  + ("[green]identical[/]" if same else "[red]DIFFERENT[/]"))
    private_releases(lg, local)


def private_releases(lg: LocalGrid, local: torch.Tensor) -> None:
    """The use case continues: DP releases against a budget, then the approval queue."""
    step("carol asks for differentially private averages instead (ε = 0.1 each, charged to her budget)")
    with lg.connect("carol") as grid:
        births = grid.search("#birth-records", "#february")["hospital"][0]
        for column, truth in zip(("weight", "height"), local.tolist(), strict=True):
            released = births[column].mean().get(epsilon=0.1)
            console.print(f"  {column}: {released!r}   (true value {truth:.4f})")
        (budget,) = grid.budget("hospital", "birth-records-feb")
        console.print(f"  her budget on hospital/birth-records-feb: ε {budget.spent_epsilon:.2f} spent of "
                      f"{budget.epsilon:g} in {budget.releases} releases")
        step("carol asks the hospital for raw access; the owner approves it from the approval queue")
        ticket = births.request_access("PhD thesis on birth weight; ethics approval 2026-117")
        while ticket.status in ("queued", "running"):
            time.sleep(0.02)
        console.print(f"  her ticket: {ticket.status}")
        owner = lg.owner(lg.home / "nodes" / "hospital.toml")
        try:
            (request,) = owner.requests()
            console.print(f"  the owner sees: {request.requester} asks '{request.kind}' on "
                          f"{', '.join(request.datasets)}: {request.reason!r}")
            console.print(f"  the owner runs: gridq requests approve hospital {request.job_id[:18]}"
                          "   (a unique prefix of the id is enough)")
            owner.approve(request.job_id)
        finally:
            owner.close()
        console.print(f"  her ticket: {ticket.wait().status}")
        weight = births["weight"].mean().get()
        console.print(f"  now carol gets the exact average weight: {weight.item():.4f} kg")


def federated_learning(lg: LocalGrid) -> None:
    """The second use case: a digit classifier trained where the data lives."""
    step("alice searches #digits and trains an MLP by federated averaging over hospital and clinic")
    test = np.load(lg.home / "data" / "digits_test.npy")
    x_test, y_test = torch.tensor(test[:, :64]), test[:, 64]
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    with lg.connect("alice") as grid:
        found = grid.search("#digits")
        data = [(found[n][0][:, :64], found[n][0][:, 64]) for n in ("hospital", "clinic")]
        t0 = time.perf_counter()
        result = grid.fit(model, data, rounds=10, lr=0.05, batch_size=32, progress=False,
                          history_db=f"sqlite:///{lg.home / 'runs.db'}")
        seconds = time.perf_counter() - t0
    for row in (result.rounds()[0], result.rounds()[-1]):
        console.print(f"  round {row.round + 1}: {row.nodes} nodes, training loss {figure(row.loss)}, "
                      f"training accuracy at the nodes {figure(row.accuracy, 3)}")
    with torch.no_grad():
        accuracy = float((result.model(x_test).argmax(1).numpy() == y_test).mean())
    console.print(f"  10 rounds in {seconds:.1f} s; accuracy on {len(y_test)} held-out digits: {accuracy:.3f} "
                  "(no digit left its node; only weights travelled, sealed)")


def start_mpc_pool(lg: LocalGrid) -> None:
    """company hosts models, hospital and public hold shares, university deals."""
    for node in MPC_NODES:
        lg.start_mpc(lg.home / "nodes" / f"{node}.toml")
    lg.wait_ready(list(MPC_NODES), workers=[f"{n}-mpc" for n in MPC_NODES])


def encrypted_inference(lg: LocalGrid) -> None:
    """The third use case: a model served secret-shared, queried privately."""
    step("the MPC pool starts: company hosts models, hospital and public hold shares, university deals")
    if "company-mpc" not in lg.procs:
        start_mpc_pool(lg)
    model = torch.nn.Linear(4, 2)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.5, -1.25, 2.0, 0.1], [-0.3, 0.7, 0.05, -2.5]]))
        model.bias.copy_(torch.tensor([0.25, -0.5]))
    step("dana (at the company) serves her linear model encrypted; only bob may query it")
    with lg.connect("dana") as grid:
        card = grid.serve(model, name="triage", parties=["hospital", "public"], crypto_provider="university",
                          host="company", queriers=["bob"])
        console.print(f"  served {card.name!r}: {len(card.plan.layers)} layer(s), weights shared over "
                      f"{', '.join(card.parties)}; no node holds a weight")
    x = torch.tensor([1.0, 2.0, -0.5, 3.0])
    with lg.connect("bob") as grid:
        step("bob lists the served models and queries 'triage' with his private input")
        console.print("  models: " + ", ".join(f"{c.name} (host {c.host})" for c in grid.models()))
        t0 = time.perf_counter()
        y = grid.query("triage", x)
        ms = (time.perf_counter() - t0) * 1000
        with torch.no_grad():
            plain = model(x)
        close = bool((y - plain).abs().max() < 1e-3)
        console.print(f"  encrypted result {[round(v, 4) for v in y.tolist()]} ({ms:.0f} ms); plaintext "
                      f"{[round(v, 4) for v in plain.tolist()]}  "
                      + ("[green]equal within 1e-3[/]" if close else "[red]DIFFERENT[/]"))
    step("eve, who is not among the model's queriers, tries")
    with lg.connect("eve") as grid:
        try:
            grid.query("triage", x)
        except PermissionDenied as exc:
            console.print(f"  [red]refused:[/] PermissionDenied: {exc}")


def _stop_on_sigterm() -> None:
    """``docker stop`` and process managers send SIGTERM: stop as cleanly as on Ctrl-C."""
    def handler(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


def run(stay_up: bool = False, home: Path | None = None, play: bool = True, edge_port: int = 0,
        mpc: bool = True) -> None:
    """``gridq demo`` (a temporary home, the use cases played, then stopped) and ``gridq up``
    (a kept home, the MPC pool started too unless ``mpc`` is false, up until Ctrl-C; the use
    cases only if asked — the third starts the pool if it is not up).
    Both start the HTTP edge too, on ``edge_port`` (0: a free port; a port that is taken: a
    free one, said so)."""
    _stop_on_sigterm()
    with tempfile.TemporaryDirectory(prefix="gridq-") as tmp:
        home = Path(home or tmp).resolve()
        configs = prepare(home)
        # the broker runs with one ACL user per node and per role (ops/acl.py): a scientist cannot
        # flush it, pop a node's queue or rewrite the registry; a node reaches only its own keys
        with LocalGrid(home, acl=True) as lg, _one_grid_per_home(home, stay_up):
            console.print("[bold]Starting a local grid[/]: Redis, gateway, nodes hospital and clinic …")
            t0 = time.perf_counter()
            if stay_up:  # the same port as last time: the URLs in broker/ (exported, handed out) stay valid
                port, note = kept_broker_port(home)
                if note:
                    console.print(f"  [yellow]{escape(note)}[/]", soft_wrap=True)
                lg.start_redis(port)
            lg.start(configs)
            if edge_port and not port_free(edge_port):
                console.print(f"  [yellow]port {edge_port} is taken: the edge takes a free one[/] (--edge-port N)")
                edge_port = 0
            lg.start_edge(edge_port or None)  # for clients that cannot reach Redis (ops/edge)
            if stay_up and mpc:
                start_mpc_pool(lg)
            elif stay_up:
                console.print("  the MPC pool is not started (--no-mpc): `gridq mpc start CONFIG` starts a node's "
                              "MPC worker", soft_wrap=True)
            console.print(f"  ready in {time.perf_counter() - t0:.1f} s — broker on port {lg.port}"
                          + (" (the same at every start: broker.port)" if stay_up else "")
                          + f", one user per node and per role ({lg.home / 'broker'}), logs in {lg.logs}",
                          soft_wrap=True)
            console.print(f"  HTTP edge: {lg.edge_url} (clients that cannot reach Redis; GET /healthz)",
                          soft_wrap=True)
            console.print(f"  broker: {lg.server}", soft_wrap=True)
            if play:
                private_statistics(lg)
                federated_learning(lg)
                encrypted_inference(lg)
            if stay_up:
                _serve_until_stopped(lg)
            console.print("\nstopping the grid …")
        console.print("[bold green]done[/]")


def gridq_bin() -> Path | None:
    """The folder of this project's ``gridq`` command (the venv's bin), which ``env.sh`` puts
    on PATH; None if it has none (gridq not installed as a command)."""
    for folder in (Path(sys.prefix) / "bin", Path(sys.executable).parent):
        if (folder / "gridq").is_file():
            return folder.absolute()
    return None


def exports_line(home: Path) -> str:
    """The line that points a shell at the grid of ``home`` (README: "A grid to work with")."""
    return f'export GRIDQ_BROKER="$(cat {shlex.quote(str(home / "broker" / "scientist.url"))})" ' \
           f"GRIDQ_HOME={shlex.quote(str(home))}"


def env_script(home: Path, bin_dir: Path | None) -> str:
    """``home/env.sh``, which a second shell sources (``. ~/.gridq/env.sh``): the exports line,
    and the project's ``gridq`` put on PATH (once, however often it is sourced)."""
    lines = [exports_line(home)]
    if bin_dir is not None:
        quoted = shlex.quote(str(bin_dir))
        lines.append(f'case ":$PATH:" in *:{quoted}:*) ;; *) export PATH={quoted}:"$PATH" ;; esac')
    return "\n".join(lines) + "\n"


def _serve_until_stopped(lg: LocalGrid) -> None:
    env_sh = lg.home / "env.sh"
    bin_dir = gridq_bin()
    env_sh.write_text(env_script(lg.home, bin_dir))
    on_path = f"It also puts {bin_dir} on PATH, for this project's gridq.\n" if bin_dir else ""
    console.print(f"\n[bold]The grid is up.[/] In another shell, run\n\n  . {escape(str(env_sh))}\n\n"
                  f"It exports what this line does (or paste the line):\n\n{escape(exports_line(lg.home))}\n\n"
                  f"{escape(on_path)}Then, for example (owner and operator commands log in as their broker users, from "
                  "$GRIDQ_HOME/broker):\n  gridq status --watch\n  gridq requests list hospital\n"
                  "  python   # and the README's examples, which connect with Grid.connect(identity=\"alice\")\n"
                  f"  curl {lg.edge_url}/v1/gateway   # the HTTP edge, for clients that cannot reach Redis\n"
                  f"Keys are in {lg.keys} (users {', '.join(USERS)}); logs in {lg.logs}. The broker keeps port "
                  f"{lg.port} across restarts. Ctrl-C stops it.", soft_wrap=True)
    try:
        while all(p.poll() is None for p in lg.procs.values()):
            time.sleep(1)
        console.print("[red]a process of the grid exited; stopping[/] (its log is in " + str(lg.logs) + ")")
    except KeyboardInterrupt:
        pass
    finally:
        env_sh.unlink(missing_ok=True)


@contextmanager
def _one_grid_per_home(home: Path, kept: bool) -> Iterator[None]:
    """Two grids on one home would share the nodes' databases: refuse the second one."""
    if not kept:
        yield
        return
    pidfile = home / "up.pid"
    try:
        other = int(pidfile.read_text())
        os.kill(other, 0)
    except (FileNotFoundError, ValueError, ProcessLookupError):
        pass
    else:
        env_sh = home / "env.sh"
        reach = f"`. {env_sh}` reaches it from another shell" if env_sh.exists() else "stop it first"
        raise InvalidRequest(f"a grid is already up on {home} (process {other}); {reach}")
    pidfile.write_text(str(os.getpid()))
    try:
        yield
    finally:
        pidfile.unlink(missing_ok=True)
