"""Optimisers and schedule: parameter groups, AdamW decay, LAMB against its formula, warm-up + linear decay."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from bertforge.config import ModelConfig
from bertforge.errors import BertforgeError
from bertforge.heads import BertForPreTraining
from bertforge.optim import Lamb, build_optimizer, default_warmup_steps, linear_schedule, param_groups


def _tiny_model() -> BertForPreTraining:
    torch.manual_seed(0)
    return BertForPreTraining(ModelConfig.preset("tiny", vocab_size=50, max_position_embeddings=32))


def test_groups_exclude_biases_and_layer_norms_and_cover_every_parameter_once():
    model = _tiny_model()
    decay, no_decay = param_groups(model, 0.01)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    not_decayed = {names[id(p)] for p in no_decay["params"]}
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    assert not decayed & not_decayed
    assert decayed | not_decayed == set(names.values())
    layer_norms = {f"{m}.{p}" for m, module in model.named_modules() if isinstance(module, nn.LayerNorm)
                   for p in ("weight", "bias")}
    assert layer_norms and layer_norms <= not_decayed
    assert all(n.endswith("bias") or n in layer_norms for n in not_decayed)
    assert "bert.embeddings.word_embeddings.weight" in decayed
    assert any("attention" in n and n.endswith("weight") for n in decayed)


@pytest.mark.parametrize("name", ["adamw", "lamb"])
def test_zero_gradient_step_decays_only_the_decay_group(name):
    model = _tiny_model()
    optimizer = build_optimizer(model, name, lr=0.1, weight_decay=0.5)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    no_decay = {id(p) for p in optimizer.param_groups[1]["params"]}
    for n, p in model.named_parameters():
        if id(p) in no_decay:
            assert torch.equal(p, before[n]), n
        elif before[n].abs().sum() > 0:
            assert p.norm() < before[n].norm(), n
    if name == "adamw":
        weight = model.bert.embeddings.word_embeddings.weight
        torch.testing.assert_close(weight, before["bert.embeddings.word_embeddings.weight"] * (1 - 0.1 * 0.5))


def _lamb_reference(weights, grads, *, lr, betas, eps, weight_decay):
    """LAMB written out from You et al. (2019), Algorithm 2, in float64."""
    x = weights.double().clone()
    m = torch.zeros_like(x)
    v = torch.zeros_like(x)
    for t, g in enumerate(grads, start=1):
        g = g.double()
        m = betas[0] * m + (1 - betas[0]) * g
        v = betas[1] * v + (1 - betas[1]) * g * g
        r = (m / (1 - betas[0] ** t)) / ((v / (1 - betas[1] ** t)).sqrt() + eps)
        u = r + weight_decay * x
        ratio = x.norm() / u.norm() if x.norm() > 0 and u.norm() > 0 else 1.0
        x = x - lr * ratio * u
    return x


def test_lamb_matches_the_papers_update():
    torch.manual_seed(1)
    weights = torch.randn(7, 5)
    grads = [torch.randn(7, 5) for _ in range(4)]
    param = nn.Parameter(weights.clone())
    optimizer = Lamb([param], lr=0.01, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.1)
    for g in grads:
        param.grad = g.clone()
        optimizer.step()
    expected = _lamb_reference(weights, grads, lr=0.01, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.1)
    torch.testing.assert_close(param.detach().double(), expected, rtol=1e-5, atol=1e-6)


def test_lamb_trust_ratio_scales_each_update_to_the_layer_norm():
    torch.manual_seed(2)
    big, small = nn.Parameter(torch.randn(10, 10) * 5), nn.Parameter(torch.randn(10) * 0.01)
    zero = nn.Parameter(torch.zeros(4))
    optimizer = Lamb([big, small, zero], lr=0.01)
    before = [p.detach().clone() for p in (big, small, zero)]
    for p in (big, small, zero):
        p.grad = torch.randn_like(p)
    optimizer.step()
    for p, b in zip((big, small), before):  # ||delta|| = lr * ||x|| whatever the gradient's scale
        torch.testing.assert_close((p - b).norm(), 0.01 * b.norm(), rtol=1e-4, atol=0)
    # all-zero weights: trust ratio 1, the first Adam step is lr * sign(g) (up to eps)
    torch.testing.assert_close(zero.detach(), -0.01 * torch.sign(zero.grad), rtol=1e-3, atol=1e-6)


def test_lamb_minimises_a_regression():
    torch.manual_seed(3)
    features = torch.randn(256, 8)
    target = features @ torch.randn(8, 1)
    layer = nn.Linear(8, 1)
    optimizer = Lamb(layer.parameters(), lr=0.05)
    schedule = linear_schedule(optimizer, warmup_steps=10, total_steps=300)
    first = None
    for _ in range(300):
        loss = ((layer(features) - target) ** 2).mean()
        first = first if first is not None else loss.item()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    assert loss.item() < 1e-3 * first


def test_lamb_rejects_bad_hyper_parameters():
    with pytest.raises(ValueError):
        Lamb([nn.Parameter(torch.zeros(1))], lr=0.0)


def test_unknown_optimizer_is_a_user_error():
    with pytest.raises(BertforgeError, match="adamw, lamb"):
        build_optimizer(_tiny_model(), "sgd", lr=1e-3, weight_decay=0.0)


def test_linear_warmup_then_linear_decay_to_zero():
    param = nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=1.0)
    schedule = linear_schedule(optimizer, warmup_steps=4, total_steps=10)
    rates = []
    for _ in range(10):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert rates[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert rates[4:] == pytest.approx([1.0, 5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6])
    assert optimizer.param_groups[0]["lr"] == 0.0  # after the last step


def test_schedule_state_round_trips_through_a_weights_only_load():
    def make():
        optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.5)
        return optimizer, linear_schedule(optimizer, warmup_steps=3, total_steps=20)

    optimizer, schedule = make()
    for _ in range(7):
        optimizer.step()
        schedule.step()
    buffer = io.BytesIO()
    torch.save(schedule.state_dict(), buffer)
    buffer.seek(0)
    restored_optimizer, restored = make()
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    for _ in range(5):
        optimizer.step(), schedule.step()
        restored_optimizer.step(), restored.step()
        assert restored_optimizer.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]


def test_rescale_moves_every_rate_at_once_and_stays_in_the_state():
    def make():
        # groups with their own peak rates, as with layer-wise decay
        optimizer = torch.optim.SGD([{"params": [nn.Parameter(torch.zeros(1))], "lr": 0.25},
                                     {"params": [nn.Parameter(torch.zeros(1))]}], lr=0.5)
        return optimizer, linear_schedule(optimizer, warmup_steps=2, total_steps=10)

    optimizer, schedule = make()
    for _ in range(4):
        optimizer.step(), schedule.step()
    before = [group["lr"] for group in optimizer.param_groups]
    schedule.rescale(0.3)
    assert [group["lr"] for group in optimizer.param_groups] == schedule.get_last_lr() == [
        0.25 * 0.3 * schedule.factor(4), 0.5 * 0.3 * schedule.factor(4)]
    assert schedule.get_last_lr()[1] == pytest.approx(0.3 * before[1])
    restored_optimizer, restored = make()
    restored.load_state_dict(schedule.state_dict())
    assert restored.scale == 0.3
    for _ in range(3):
        optimizer.step(), schedule.step()
        restored_optimizer.step(), restored.step()
        assert restored_optimizer.param_groups[1]["lr"] == optimizer.param_groups[1]["lr"]


def test_a_lambdalr_state_of_an_older_checkpoint_loads_with_its_lowered_rates():
    """Checkpoints before LinearSchedule hold a LambdaLR's state; a rollback had scaled its `base_lrs`."""
    from torch.optim.lr_scheduler import LambdaLR
    reference = linear_schedule(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0), warmup_steps=2,
                                total_steps=10)
    old_optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    old = LambdaLR(old_optimizer, lambda step: reference.factor(step))  # a function, as the old code passed
    for _ in range(3):
        old_optimizer.step(), old.step()
    old.base_lrs = [0.3]
    state = old.state_dict()
    assert state["lr_lambdas"] == [None] and "scale" not in state
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = linear_schedule(optimizer, warmup_steps=2, total_steps=10)
    schedule.load_state_dict(state)
    assert schedule.scale == 1.0 and not hasattr(schedule, "lr_lambdas")
    for _ in range(5):
        old_optimizer.step(), old.step()
        optimizer.step(), schedule.step()
        assert optimizer.param_groups[0]["lr"] == old_optimizer.param_groups[0]["lr"]


def test_end_at_moves_the_end_of_the_decay_within_the_plan_and_a_checkpoint_keeps_it():
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = linear_schedule(optimizer, warmup_steps=4, total_steps=100)
    for _ in range(10):
        optimizer.step(), schedule.step()
    schedule.end_at(20)  # the rate now falls from 1 at step 4 to 0 at step 20: (20 - 10) / 16 after 10 steps
    assert schedule.factor(10) == pytest.approx(10 / 16)
    schedule.end_at(500)
    assert schedule.total_steps == 100  # never past the planned last step
    schedule.end_at(2)
    assert schedule.total_steps == 5  # never into the warm-up
    schedule.end_at(40)
    restored = linear_schedule(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0), warmup_steps=4,
                               total_steps=100)
    restored.load_state_dict(schedule.state_dict())
    assert (restored.total_steps, restored.planned_steps) == (40, 100)
    restored.end_at(1000)
    assert restored.total_steps == 100


def test_default_warmup_is_ten_percent_capped_at_ten_thousand():
    assert default_warmup_steps(1000) == 100
    assert default_warmup_steps(15) == 2
    assert default_warmup_steps(1_000_000) == 10_000


def test_schedule_rejects_warmup_longer_than_the_run():
    with pytest.raises(BertforgeError, match="warm-up"):
        linear_schedule(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0), warmup_steps=11, total_steps=10)


def test_layer_lr_decay_gives_each_depth_its_rate_and_keeps_the_decay_split():
    from bertforge.heads import BertForSequenceClassification
    torch.manual_seed(0)
    model = BertForSequenceClassification(ModelConfig.preset("tiny", vocab_size=50, max_position_embeddings=32), 3)
    names = {id(p): n for n, p in model.named_parameters()}
    optimizer = build_optimizer(model, "adamw", lr=1e-3, weight_decay=0.01, layer_lr_decay=0.5)
    rate = {names[id(p)]: (g["lr"], g["weight_decay"]) for g in optimizer.param_groups for p in g["params"]}
    assert set(rate) == set(names.values())  # every parameter once
    layers = 2  # tiny
    assert rate["classifier.weight"] == (1e-3, 0.01) and rate["classifier.bias"] == (1e-3, 0.0)
    assert rate["bert.pooler.dense.weight"][0] == 1e-3
    for i in range(layers):
        expected = 1e-3 * 0.5 ** (layers - i)
        layer = {n: r for n, r in rate.items() if n.startswith(f"bert.encoder.layers.{i}.")}
        assert layer and all(r[0] == pytest.approx(expected) for r in layer.values()), (i, layer)
    embeddings = {n: r for n, r in rate.items() if ".embeddings." in n}
    assert embeddings and all(r[0] == pytest.approx(1e-3 * 0.5 ** (layers + 1)) for r in embeddings.values())
    assert rate["bert.embeddings.layer_norm.weight"][1] == 0.0
    assert rate["bert.embeddings.word_embeddings.weight"][1] == 0.01
    # the schedule scales every group alike: after warm-up each keeps its ratio to the head's rate
    scheduler = linear_schedule(optimizer, warmup_steps=2, total_steps=10)
    for _ in range(5):
        optimizer.step()
        scheduler.step()
    head = next(g["lr"] for g in optimizer.param_groups if any(names[id(p)] == "classifier.weight" for p in g["params"]))
    ratios = sorted({round(g["lr"] / head, 9) for g in optimizer.param_groups})
    assert ratios == [round(0.5 ** k, 9) for k in range(layers + 1, -1, -1)]


def test_layer_lr_decay_one_is_the_two_plain_groups_and_bad_values_are_refused():
    model = _tiny_model()
    assert [len(g["params"]) for g in param_groups(model, 0.01)] == \
        [len(g["params"]) for g in param_groups(model, 0.01, lr=1.0, layer_lr_decay=1.0)]
    with pytest.raises(BertforgeError, match="layer-lr-decay"):
        build_optimizer(model, "adamw", lr=1e-3, weight_decay=0.0, layer_lr_decay=0.0)
