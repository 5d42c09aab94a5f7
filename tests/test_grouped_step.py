"""The grouped GaLore-AdamW step (optim/grouped.py): the same updates as the per-parameter step, in few operations."""

from __future__ import annotations

import importlib.util
import io
from pathlib import Path

import pytest
import torch
from torch import nn

from galore_train.optim import GaLoreAdamW, NaturalGaLoreAdamW
from galore_train.optim.grouped import applies

SHAPES = [(32, 48)] * 3 + [(48, 32)] * 2 + [(40, 40)] * 2 + [(24, 56)]  # three shapes share, one alone
PLAIN_SHAPES = [(7,), (5, 3), (9,)]
GAP = 3  # refreshes at steps 0, 3, 6


def build(foreach, params=None, optimizer=GaLoreAdamW, **group):
    """An optimizer over SHAPES (GaLore group) and PLAIN_SHAPES (plain group), on `params` or seeded new ones."""
    if params is None:
        generator = torch.Generator().manual_seed(1)
        params = [nn.Parameter(torch.randn(shape, generator=generator)) for shape in SHAPES + PLAIN_SHAPES]
    matrices, plain = params[: len(SHAPES)], params[len(SHAPES) :]
    groups = [
        {"params": plain, "foreach": foreach},
        {"params": matrices, "rank": 8, "update_proj_gap": GAP, "foreach": foreach, **group},
    ]
    return params, optimizer(groups, lr=1e-2, weight_decay=0.1)


def gradients(step: int, params: list[nn.Parameter], poisoned: int = 1) -> list[torch.Tensor]:
    """Seeded gradients; at step 3 (a refresh) matrix `poisoned` gets a NaN, so its update must be skipped."""
    generator = torch.Generator().manual_seed(100 + step)
    grads = [torch.randn(p.shape, generator=generator) for p in params]
    if step == GAP:
        grads[poisoned][0, 0] = float("nan")
    return grads


def round_trip(optimizer, params, foreach, **group):
    """A fresh optimizer on copies of the weights, loaded from the state_dict through torch.save/torch.load."""
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)
    copies = [nn.Parameter(p.detach().clone()) for p in params]
    copies, restored = build(foreach, copies, **group)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    return copies, restored


@pytest.mark.parametrize(
    "group",
    [
        {},
        {"proj_type": "full"},
        {"proj_type": "reverse_std"},
        {"moment_dtype": torch.float64},
        {"proj_bits": 8, "proj_group_size": 64},
    ],
    ids=["std", "full", "reverse_std", "moment_dtype", "int8_projection"],
)
def test_grouped_updates_equal_the_per_parameter_ones(group) -> None:
    """8 steps: refreshes at 0, 3 (with a NaN gradient: that matrix is skipped in both) and 6, and a state_dict
    round trip after step 4, saved by the per-parameter optimizer and loaded by the grouped one (same format)."""
    reference, by_parameter = build(False, **group)
    together, grouped = build(True, **group)
    with pytest.warns(RuntimeWarning, match="non-finite gradient"):
        for step in range(8):
            for a, b, grad in zip(reference, together, gradients(step, reference)):
                a.grad, b.grad = grad.clone(), grad.clone()
            by_parameter.step()
            grouped.step()
            if step == 4:
                assert by_parameter.state_dict()["state"].keys() == grouped.state_dict()["state"].keys()
                together, grouped = round_trip(by_parameter, together, True, **group)
    for a, b in zip(reference, together):
        assert torch.isfinite(b).all()
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6)
    states = zip(by_parameter.state.values(), grouped.state.values())
    assert all(a["step"] == b["step"] for a, b in states)
    assert by_parameter.state[reference[1]]["step"] == 7  # the NaN gradient's update was skipped


@pytest.mark.slow  # builds two llama_60m optimizers and refreshes their 2 x 56 projections: minutes on a loaded CPU
def test_the_grouped_step_takes_few_operations() -> None:
    """The target: <= 150 aten operations per normal step of llama_60m's whole optimizer (counted as in
    scripts/bench_optimizer.py; the per-parameter step dispatches 770)."""
    bench = _load_script("bench_optimizer")
    optimizers = bench.whole_model_optimizers("llama_60m", 128, ["GaLoreAdamW, per parameter", "GaLoreAdamW, grouped"])
    per_parameter, grouped = (bench.count_dispatched(optimizer.step) for optimizer in optimizers.values())
    assert grouped.ops <= 150 and grouped.host_reads == 0
    assert per_parameter.ops == 770


def test_where_the_grouped_step_applies() -> None:
    params = [nn.Parameter(torch.randn(4, 4)) for _ in range(2)]
    for p in params:
        p.grad = torch.randn(4, 4)
    named = [(None, p) for p in params]
    assert applies({"foreach": True}, named)
    assert not applies({"foreach": None}, named)  # CPU: the fused per-parameter step by default
    assert not applies({"foreach": True}, named[:1])  # layer-wise updates: one gradient at a time
    params[0].grad = params[0].grad.to_sparse()
    assert not applies({"foreach": True}, named)


def test_a_subclass_that_changes_the_update_keeps_the_per_parameter_step() -> None:
    """Natural GaLore preconditions R in its own _update: a "foreach" group key must not bypass it."""
    reference, by_parameter = build(False, optimizer=NaturalGaLoreAdamW)
    together, grouped = build(True, optimizer=NaturalGaLoreAdamW)
    for step in range(2):
        for a, b, grad in zip(reference, together, gradients(step, reference)):
            a.grad, b.grad = grad.clone(), grad.clone()
        by_parameter.step()
        grouped.step()
    for a, b in zip(reference, together):
        assert torch.equal(a, b)


def _load_script(name: str):
    path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
