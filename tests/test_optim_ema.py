import math

import pytest
import torch

from hdiffusion.ema import ema_decay, ema_update
from hdiffusion.optim import scheduled_lr, set_learning_rates

EMA = {"type": "inverse", "power": 0.75, "inv_gamma": 1.0, "max_value": 0.999, "min_value": 0.0, "start_at": 0}


def test_ema_warmup_closed_form():
    for t in [0, 1, 10, 100]:
        expected = 1 - (1 + t) ** -0.75
        assert ema_decay(t, EMA) == pytest.approx(min(expected, 0.999))
    assert ema_decay(0, EMA) == 0.0  # the first update copies the model
    assert ema_decay(10**9, EMA) == 0.999
    assert ema_decay(3, dict(EMA, start_at=5)) == 0.0
    assert ema_decay(5, dict(EMA, start_at=5, min_value=0.5)) == 0.5


def test_ema_update_is_lerp():
    model, ema = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    before = ema.weight.detach().clone()
    ema_update(ema, model, 0.9)
    torch.testing.assert_close(ema.weight, 0.9 * before + 0.1 * model.weight, rtol=0, atol=1e-7)
    ema_update(ema, model, 0.0)
    torch.testing.assert_close(ema.weight, model.weight, rtol=0, atol=0)


def schedule(**kwargs):
    base = {"type": "constant", "warmup": 0.0, "inv_gamma": 20000.0, "power": 1.0, "num_steps": 50000,
            "decay": 0.5, "min_lr": 0.0}
    return dict(base, **kwargs)


def test_lr_schedules_closed_form():
    assert scheduled_lr(2.0, 123, schedule()) == 2.0
    assert scheduled_lr(1.0, 0, schedule(warmup=0.99)) == pytest.approx(0.01)
    assert scheduled_lr(1.0, 99, schedule(warmup=0.99)) == pytest.approx(1 - 0.99 ** 100)
    assert scheduled_lr(1.0, 20000, schedule(type="inverse")) == pytest.approx(0.5)
    assert scheduled_lr(1.0, 50000, schedule(type="exponential")) == pytest.approx(0.5)
    assert scheduled_lr(1.0, 25000, schedule(type="exponential")) == pytest.approx(math.sqrt(0.5))
    # The floor applies before the warm-up, as in k-diffusion.
    assert scheduled_lr(1.0, 0, schedule(type="inverse", min_lr=0.8, warmup=0.5)) == pytest.approx(0.5 * 1.0)
    assert scheduled_lr(1.0, 20000, schedule(type="inverse", min_lr=0.8, warmup=0.5)) == pytest.approx(0.8)


def test_set_learning_rates_scales_each_group_and_floors():
    params = [torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))]
    optimizer = torch.optim.AdamW([{"params": [params[0]], "lr": 1.0}, {"params": [params[1]], "lr": 1 / 3}])
    set_learning_rates(optimizer, [1.0, 1 / 3], 20000, schedule(type="inverse", min_lr=0.2))
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.5, 0.2])
