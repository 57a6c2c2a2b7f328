"""Models travel as a graph of allow-listed parts plus safetensors weights, and come back
bit for bit; anything off the allow-lists is refused by name; FedAvg and local training
are plain, deterministic math."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from orchestrator.fl import fedavg
from orchestrator.strategies import FedAdam, FedProx, strategy
from protocol.errors import ForbiddenOperation, InvalidRequest
from protocol.messages import TrainConfig
from protocol.model import ModelSpec, build_model, describe_model, flatten_state, unflatten_state
from workers.jobs.training import Models, train


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.LeakyReLU(0.1),
                                      nn.MaxPool2d(2), nn.AvgPool2d(1))
        self.drop = nn.Dropout(0.2)
        self.head = nn.Linear(4 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x.view(x.shape[0], 1, 8, 8))
        x = self.drop(torch.flatten(x, 1))
        return F.log_softmax(self.head(x) + 0.5, dim=1)


@pytest.mark.parametrize("make", [lambda: nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10),
                                                        nn.Softmax(dim=1)),
                                  lambda: nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.BatchNorm1d(8),
                                                        nn.Sigmoid(), nn.Linear(8, 3), nn.LogSoftmax(dim=1)),
                                  ConvNet])
def test_a_model_round_trips_bit_for_bit(make) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(1)
    model = make().eval()
    spec, state = describe_model(model)
    wire = json.loads(spec.model_dump_json())  # what travels: JSON, and safetensors for the weights
    rebuilt = build_model(ModelSpec.model_validate(wire), state).eval()
    x = torch.randn(6, 64)
    assert torch.equal(rebuilt(x), model(x))


def hostile(spec: ModelSpec, **node: object) -> ModelSpec:
    raw = spec.model_dump(mode="json")
    raw["graph"][1] = {**raw["graph"][1], **node}
    return ModelSpec.model_validate(raw)


def test_anything_off_the_allow_lists_is_refused_by_name() -> None:
    spec, _ = describe_model(nn.Sequential(nn.Linear(4, 2)))
    for node, message in (({"op": "call_function", "target": "os.system"}, "function 'os.system'"),
                          ({"op": "call_function", "target": "eval"}, "function 'eval'"),
                          ({"op": "call_method", "target": "__reduce__"}, "method '__reduce__'"),
                          ({"op": "call_module", "target": "nowhere"}, "undeclared layer 'nowhere'"),
                          ({"op": "call_function", "target": "getattr",
                            "args": [{"node": "input_1"}, "__class__"]}, "getattr may read only")):
        with pytest.raises(ForbiddenOperation, match=message):
            build_model(hostile(spec, **node))
    raw = spec.model_dump(mode="json")
    raw["layers"]["0"]["kwargs"]["device"] = "cuda"
    with pytest.raises(ForbiddenOperation, match="takes no argument"):
        build_model(ModelSpec.model_validate(raw))
    with pytest.raises(InvalidRequest, match="before it is defined"):
        build_model(hostile(spec, args=[{"node": "output"}]))
    with pytest.raises(ForbiddenOperation, match="GRU"):
        describe_model(nn.Sequential(nn.GRU(2, 2)))

    class Sneaky(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.special.erf(x)

    with pytest.raises(ForbiddenOperation, match="erf"):
        describe_model(Sneaky())


def test_a_bare_layer_is_refused_with_the_way_to_send_it() -> None:
    with pytest.raises(InvalidRequest, match=r"not a bare layer: wrap it, e\.g\. torch\.nn\.Sequential\(Linear"):
        describe_model(nn.Linear(4, 2))
    spec, state = describe_model(nn.Sequential(nn.Linear(4, 2)))  # as the message says
    assert set(state) == {"0.weight", "0.bias"} and spec.layers["0"].type == "Linear"


def test_weights_flatten_and_come_back_typed() -> None:
    _, state = describe_model(nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2)))
    flat = flatten_state(state)
    back = unflatten_state(flat, state)
    assert all(torch.equal(back[k], v) and back[k].dtype == v.dtype for k, v in state.items())
    assert flat.dtype == torch.float64  # BatchNorm's batch count is an integer: float64 holds it exactly
    with pytest.raises(InvalidRequest, match="does not fit"):
        unflatten_state(flat[:-1], state)
    _, floats = describe_model(nn.Sequential(nn.Linear(3, 2), nn.ReLU(), nn.Linear(2, 1)))
    assert flatten_state(floats).dtype == torch.float32  # all float32: half the bytes, still exact


def test_fedavg_weights_by_samples() -> None:
    like = {"w": torch.zeros(2)}
    avg = fedavg(like, [("a", torch.tensor([1.0, 1.0], dtype=torch.float64), 1),
                        ("b", torch.tensor([4.0, 0.0], dtype=torch.float64), 3)])
    assert torch.allclose(avg["w"], torch.tensor([3.25, 0.25]))


def test_fedadam_steps_with_torch_adam_toward_the_average() -> None:
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    _, state = describe_model(model)
    average = {k: v + 1 for k, v in state.items()}  # every weight and buffer one above the model's
    server = FedAdam(lr=0.1, betas=(0.9, 0.99), eps=1e-3)
    server.start(model)
    new = server.aggregate(average)
    for name, _ in model.named_parameters():
        # Adam's first step, bias-corrected, with the pseudo-gradient g = w − average = −1:
        # w − lr·g/(|g| + ε) — a step of 0.1/1.001 toward the average, not onto it
        assert torch.allclose(new[name], state[name] + 0.1 / 1.001)
    for name in ("1.running_mean", "1.running_var", "1.num_batches_tracked"):
        assert torch.equal(new[name], average[name])  # buffers are averaged, not optimized
    with pytest.raises(InvalidRequest, match="lr > 0"):
        FedAdam(lr=0.0)


def test_strategies_by_object_or_name() -> None:
    assert strategy("fedavg").config() == {"strategy": "fedavg"}
    assert strategy("fedadam").config()["server_lr"] == 0.03
    assert FedProx(mu=0.1).proximal_mu == 0.1 and FedProx(mu=0.1).config()["proximal_mu"] == 0.1
    average = {"w": torch.ones(2)}
    assert strategy("fedavg").aggregate(average) is average  # FedAvg: the average is the new model
    with pytest.raises(InvalidRequest, match=r"FedProx\(mu=0.01\)"):
        strategy("fedprox")
    with pytest.raises(InvalidRequest, match="mu > 0"):
        FedProx(mu=0.0)
    with pytest.raises(InvalidRequest, match="not known"):
        strategy("fedsgd")


def test_a_node_reuses_a_rebuilt_model_only_when_it_is_safe() -> None:
    models = Models()
    spec, _ = describe_model(nn.Sequential(nn.Linear(3, 2)))
    other, _ = describe_model(nn.Sequential(nn.Linear(3, 4)))
    with models.lend(spec) as first:
        next(first.parameters()).grad = torch.ones(2, 3)  # as a job leaves it
    with models.lend(spec) as again, models.lend(spec) as meanwhile:
        assert again is first and next(again.parameters()).grad is None  # the same graph: reused, gradients gone
        assert meanwhile is not first  # lent to one job at a time
    with models.lend(other) as different:
        assert different is not first
    with pytest.raises(RuntimeError), models.lend(spec) as failed:
        raise RuntimeError("the job failed")
    with models.lend(spec, give_back=False) as wrapped:  # DP-SGD hooks the layers: never given back
        assert wrapped is not failed
    with models.lend(spec) as fresh:
        assert fresh is not failed and fresh is not wrapped


def test_local_training_is_deterministic_for_a_seed() -> None:
    x, y = torch.randn(50, 4), torch.randint(0, 3, (50,))
    outs = []
    for _ in range(2):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.3), nn.ReLU(), nn.Linear(8, 3))
        metrics = train(model, x, y, TrainConfig(epochs=3, batch_size=8, lr=0.1, momentum=0.9, seed=7))
        outs.append((flatten_state(model.state_dict()), metrics.loss))
    assert torch.equal(outs[0][0], outs[1][0]) and outs[0][1] == outs[1][1]
    with pytest.raises(InvalidRequest, match="same, non-zero number of rows"):
        train(model, x, y[:10], TrainConfig())


def test_dp_sgd_clips_noises_and_costs_what_its_accountant_says() -> None:
    from opacus.accountants import RDPAccountant

    from protocol.messages import DPConfig
    from workers.jobs.training import dp_charge

    x, y = torch.randn(120, 4), torch.randint(0, 3, (120,))
    config, dp = TrainConfig(epochs=2, batch_size=30, lr=0.1, seed=3), DPConfig(noise_multiplier=1.1,
                                                                                 max_grad_norm=1.0, delta=1e-5)
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        before = flatten_state(model.state_dict())
        metrics = train(model, x, y, config, dp)
        runs.append(flatten_state(model.state_dict()))
        assert not torch.equal(runs[-1], before)
        assert not any(model._forward_hooks for model in model.modules())  # Opacus' hooks are gone
    assert torch.equal(runs[0], runs[1])  # noise too is seeded
    accountant = RDPAccountant()
    accountant.history = [(1.1, 30 / 120, 2 * 4)]
    assert metrics.epsilon == pytest.approx(accountant.get_epsilon(delta=1e-5))
    assert dp_charge(config, dp, 120).epsilon == metrics.epsilon and dp_charge(config, dp, 120).delta == 1e-5


def test_dp_sgd_charges_compose_with_the_other_releases() -> None:
    from protocol.dp import Charge, spent

    sgd = Charge("dpsgd", 0.5, 1e-6)
    assert spent([Charge("laplace", 0.2, 0.0), sgd, sgd], 1e-5) == pytest.approx((1.2, 2e-6))
    eps_gauss_alone, _ = spent([Charge("gaussian", 0.0, 1e-5, rho=0.01)], 1e-5)
    eps_mixed, delta_mixed = spent([Charge("gaussian", 0.0, 1e-5, rho=0.01), sgd], 1e-5)
    assert delta_mixed == 1e-5 and eps_mixed > eps_gauss_alone + 0.5  # the Gaussian converts at a smaller δ


def test_fedprox_keeps_local_training_near_the_global_weights() -> None:
    x, y = torch.randn(200, 4), torch.randint(0, 3, (200,))
    drift = {}
    for mu in (0.0, 10.0):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        start = flatten_state(model.state_dict())
        train(model, x, y, TrainConfig(epochs=5, batch_size=20, lr=0.1, proximal_mu=mu, seed=1))
        drift[mu] = (flatten_state(model.state_dict()) - start).norm().item()
    assert drift[10.0] < 0.5 * drift[0.0]
