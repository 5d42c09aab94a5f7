"""APOLLO's random projection is the same on every process, whatever the device's generator would draw.

CUDA's Philox output depends on the card's multiprocessor count (pytorch #62467, #87992), so DDP ranks on
different GPUs would project differently if APOLLO drew P with a device generator. Simulated here: in each
of two gloo processes, every generator bound to a device draws numbers that depend on the process (as two
different cards would); only the default CPU generator is the same everywhere. Both ranks must still hold
the same P and, stepping on the same gradients, the same weights.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from galore_train.optim.apollo import ApolloAdamW, gaussian_projection, projection_seed

SHAPE, RANK, GAP, STEPS = (16, 24), 4, 2, 5


def _skew_device_generators(rank: int) -> None:
    """torch.Generator(device=...) now draws per-process numbers; torch.Generator() (the CPU's) is untouched."""
    real = torch.Generator

    class HardwareDependent:
        def __init__(self, device):
            self.device = device

        def manual_seed(self, seed: int) -> torch.Generator:
            return real().manual_seed((seed + 7919 * (rank + 1)) % 2**63)

    torch.Generator = lambda device=None: real() if device is None else HardwareDependent(device)


def _worker(rank: int, init_file: str, results: dict) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    _skew_device_generators(rank)
    projection = gaussian_projection(torch.Size(SHAPE), "left", RANK, projection_seed(0, 0, 0), "cpu", torch.float32)
    weight = torch.nn.Parameter(torch.zeros(SHAPE))
    optimizer = ApolloAdamW([{"params": [weight], "rank": RANK, "update_proj_gap": GAP}], lr=0.01)
    generator = torch.Generator().manual_seed(3)
    for _ in range(STEPS):
        weight.grad = torch.randn(SHAPE, generator=generator)
        optimizer.step()
    gathered = [torch.empty(0) for _ in range(2)]
    dist.all_gather_object(gathered, (projection, weight.detach()))
    if rank == 0:
        results["gathered"] = gathered
    dist.destroy_process_group()


def test_two_processes_with_different_device_generators_hold_the_same_projection(tmp_path):
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_worker, args=(str(tmp_path / "init"), results), nprocs=2, join=True)
        (p0, w0), (p1, w1) = results["gathered"]
    assert torch.equal(p0, p1)
    assert torch.equal(w0, w1) and w0.abs().sum() > 0
