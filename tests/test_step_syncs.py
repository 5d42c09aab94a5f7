"""Device reads per optimizer step (issue 15): on a GPU each one stalls the host until the device catches up.
The count is taken on CPU, where every read goes through the same operator: `aten._local_scalar_dense`
(`.item()`, `int()`, `float()`, `bool()` of a tensor). Host-side batch counts use numpy, so every read
counted here would be a device read on a GPU."""

import pytest
import torch
from conftest import tiny_run_args
from torch.utils._python_dispatch import TorchDispatchMode

from galore_train.config import TrainConfig
from galore_train.train import Trainer


class ScalarReads(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.paused = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default and not self.paused:
            self.count += 1
        return func(*args, **(kwargs or {}))


def reads_per_step(config_file, output_dir, **overrides) -> int:
    """Reads in one step of the training loop itself. Not counted: inside `optimizer.step()`, where torch's
    AdamW reads its step counters, which it keeps on the host (not device reads on a GPU)."""
    trainer = Trainer(TrainConfig(**tiny_run_args(config_file, output_dir, **overrides)))
    trainer._train_step()  # warm-up: first-step allocations
    reads = ScalarReads()
    step = trainer.optimizer.step

    def uncounted_step(*args, **kwargs):
        reads.paused = True
        try:
            return step(*args, **kwargs)
        finally:
            reads.paused = False

    trainer.optimizer.step = uncounted_step
    with reads:
        trainer._train_step()
    trainer.train_stream.close()  # run() would: stop the prefetch thread
    return reads.count


@pytest.mark.parametrize("accumulation", [1, 4])
def test_a_plain_step_reads_the_device_twice_plus_once_per_forward(
    tiny_config_file, tmp_path, shared_data, accumulation
):
    """The loop reads the step's summed loss and its gradient norm; transformers (5.x) reads once per forward
    while building the causal mask (`mask.all()`, or packed-sequence detection without a mask). Before
    (9b0580b, the same counter): 6 reads per step with one micro-batch, 21 with four (4 per micro-batch in the
    loop: its two token counts, its loss, the loss's target count; 1 in transformers; the norm)."""
    reads = reads_per_step(tiny_config_file, tmp_path / "run", batch_size=2, total_batch_size=2 * accumulation)
    assert reads == 2 + accumulation


def test_a_layerwise_step_also_checks_each_loss_and_gradient(tiny_config_file, tmp_path, shared_data):
    """Layer-wise updates happen inside backward: each micro-batch's loss is read before its backward, and
    each gradient's norm before its update (TINY_LLAMA: 21 parameters)."""
    parameters, forwards = 21, 2
    reads = reads_per_step(tiny_config_file, tmp_path / "run", batch_size=2, total_batch_size=4, layerwise=True)
    assert reads == 2 + forwards + forwards + parameters  # + each loss, + a finiteness check per parameter


@pytest.mark.parametrize("clipping", [0.0, 0.5])
def test_the_gradient_norm_rescales_gradients_only_when_clipping(clipping: float) -> None:
    """clip_grad_norm_(..., inf), the norm without clipping, multiplied every gradient by 1 (a pass over all of
    them per step; issue 23): now they are not written. With clipping, the values are clip_grad_norm_'s exactly."""
    from galore_train.updates import PlainUpdates

    generator = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.Linear(4, 3))
    grads = []
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=generator)
        grads.append(p.grad)
    versions, expected = [g._version for g in grads], [g.clone() for g in grads]
    reference = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    for p, g in zip(reference, expected):
        p.grad = g
    norm = torch.nn.utils.clip_grad_norm_(reference, clipping or float("inf"))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    assert PlainUpdates(model, model, optimizer, grad_clipping=clipping).finish() == float(norm)
    written = [g._version != v for g, v in zip(grads, versions)]
    assert written == [bool(clipping)] * len(grads)
    for g, p in zip(grads, reference):
        assert torch.equal(g, p.grad)
