"""The CUDA tier: the GPU paths the CPU suite cannot reach. `pytest -m cuda` collects them; each skips with a
reason where torch sees no CUDA device (as on the machine this project is developed on: none of these has run on
a GPU yet). `scripts/gpu_check.sh` runs them on a GPU and measures.

The CPU suite keeps its runs on the CPU (conftest sets GALORE_TRAIN_DEVICE=cpu); these tests lift that, so the
trainer picks cuda:0 as it does for a user.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch
from conftest import SHARED_DATA, TINY_LLAMA, TOKENIZER, TRAIN_FILES, tiny_run_args
from transformers import LlamaConfig

from galore_train import distributed
from galore_train.config import TrainConfig
from galore_train.data import PretrainingStream, Tokenize, document_source, load_tokenizer, pin_batches
from galore_train.evaluate import to_device
from galore_train.memory.meter import GIB, MemoryMeter
from galore_train.model import bf16_native, build_model, resolve_dtype
from galore_train.optim import GaLoreAdamW, GaLoreAdamW8bit
from galore_train.optimizers import build_optimizer
from galore_train.train import Trainer

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the CUDA tier runs on a GPU only"),
]
CUDA = torch.device("cuda", 0)
CONFIG = LlamaConfig(**{**TINY_LLAMA, "vocab_size": 512})  # a 512-token vocabulary: the optimizer-only tests


@pytest.fixture(autouse=True)
def on_the_gpu(monkeypatch):
    """Runs pick the GPU, as a user's do; every test starts from a clean allocator."""
    monkeypatch.delenv(distributed.DEVICE_ENV, raising=False)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(CUDA)


@pytest.fixture
def real_data() -> Path:
    if not (SHARED_DATA / "c4").is_dir():
        pytest.skip(f"the real C4 shards and tokenizer are not here ({SHARED_DATA}; set GALORE_TRAIN_SHARED_DATA)")
    return SHARED_DATA


def records(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def step_records(output_dir: Path) -> list[dict]:
    return [r for r in records(output_dir) if "loss" in r]


def gpu_run(config_file: str, output_dir: Path, **overrides) -> Trainer:
    """A tiny real-data run on the GPU at --dtype auto (bf16 on Ampere and later); the trainer, after run()."""
    values = tiny_run_args(config_file, output_dir, **{"dtype": "auto", "eval_every": 100, **overrides})
    trainer = Trainer(TrainConfig(**values))
    trainer.run()
    return trainer


def random_grads(params: list[torch.nn.Parameter], seed: int) -> None:
    generator = torch.Generator(device=CUDA).manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator, device=CUDA).to(p.dtype)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def one_process_torchrun(monkeypatch):
    """What `torchrun --nproc_per_node 1` sets: distributed.setup() makes a 1-process NCCL group."""
    variables = dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
    for name, value in {**variables, "MASTER_PORT": str(free_port())}.items():
        monkeypatch.setenv(name, value)
    yield
    distributed.teardown()


# --- device and dtype ----------------------------------------------------------------------------------


def test_a_run_takes_the_gpu_and_bf16_where_it_is_native():
    assert distributed.choose_device() == CUDA
    assert resolve_dtype("auto", CUDA) == (torch.bfloat16 if bf16_native(CUDA) else torch.float32)


def test_bf16_training_steps_on_the_gpu(tiny_config_file, tmp_path, real_data):
    trainer = gpu_run(tiny_config_file, tmp_path / "run", optimizer="galore_adamw", rank=8, gap=2)
    assert all(p.device.type == "cuda" for p in trainer.model.parameters())
    if bf16_native(CUDA):
        assert trainer.dtype == torch.bfloat16
    steps = step_records(tmp_path / "run")
    assert len(steps) == 6 and all(torch.isfinite(torch.tensor(r["loss"])) for r in steps)
    assert steps[-1]["loss"] < steps[0]["loss"] + 0.5
    # The CUDA meter: the allocator's peaks, reserved beside allocated.
    assert all(0 < r["peak_memory_gb"] <= r["peak_reserved_gb"] for r in steps)


# --- optimizers on the device --------------------------------------------------------------------------


def test_8bit_galore_keeps_uint8_moments_on_the_gpu():
    """bitsandbytes' CUDA block-wise kernels under GaLoreAdamW8bit, with bf16 weights."""
    params = [torch.nn.Parameter(torch.randn(512, 256, device=CUDA, dtype=torch.bfloat16)) for _ in range(2)]
    before = [p.detach().clone() for p in params]
    optimizer = GaLoreAdamW8bit([{"params": params, "rank": 32, "update_proj_gap": 2}], lr=1e-3)  # 16,384 moments
    for step in range(3):
        random_grads(params, step)
        optimizer.step()
    state = optimizer.state[params[0]]
    eightbit = [v for v in state.values() if torch.is_tensor(v) and v.dtype == torch.uint8]
    assert eightbit and all(v.device.type == "cuda" for v in eightbit)
    assert all(bool(torch.isfinite(p).all()) and not torch.equal(p, b) for p, b in zip(params, before))


def test_the_model_is_filled_on_the_gpu_with_the_fp32_values_cast_to_bf16():
    """Built on the meta device and filled on the GPU (galore_train/initial_weights.py): bf16 holds fp32's values
    cast, as on the CPU (tests/test_model.py), and the rotary buffers are a host build's."""
    fp32 = build_model(CONFIG, seed=0, device=CUDA)
    bf16 = build_model(CONFIG, seed=0, dtype=torch.bfloat16, device=CUDA)
    assert {p.device for p in bf16.parameters()} == {CUDA}
    assert all(torch.equal(a.to(torch.bfloat16), b) for a, b in zip(fp32.parameters(), bf16.parameters()))
    host = dict(build_model(CONFIG, seed=0).named_buffers())
    assert all(torch.equal(b.cpu(), host[name]) for name, b in bf16.named_buffers())


def test_bitsandbytes_adamw8bit_on_the_gpu():
    model = build_model(CONFIG, seed=0, dtype=torch.bfloat16).to(CUDA)
    optimizer = build_optimizer(model, TrainConfig(optimizer="adam8bit", lr=1e-3))
    ids = torch.randint(0, CONFIG.vocab_size, (2, 32), device=CUDA)
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    states = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    assert any(v.dtype == torch.uint8 and v.device.type == "cuda" for v in states)


def test_the_svd_runs_in_float32_on_the_device(monkeypatch):
    """GaLore's refresh of a bf16 gradient: the SVD on the GPU, in float32 (cuSOLVER has no bf16 SVD)."""
    seen = []
    real_svd = torch.linalg.svd

    def recording_svd(matrix, *args, **kwargs):
        seen.append((matrix.device.type, matrix.dtype))
        return real_svd(matrix, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "svd", recording_svd)
    params = [torch.nn.Parameter(torch.randn(128, 96, device=CUDA, dtype=torch.bfloat16))]
    optimizer = GaLoreAdamW([{"params": params, "rank": 8, "update_proj_gap": 10}], lr=1e-3)
    random_grads(params, 0)
    optimizer.step()
    assert seen == [("cuda", torch.float32)]
    assert optimizer.state[params[0]]["projection"].device.type == "cuda"


# --- data and memory -----------------------------------------------------------------------------------


def test_batches_for_the_gpu_are_pinned_and_copied_without_blocking(real_data):
    assert pin_batches(CUDA) and not pin_batches(torch.device("cpu"))
    tokenize = Tokenize(load_tokenizer(TOKENIZER), 64, 32000)
    stream = PretrainingStream(
        lambda: document_source(TRAIN_FILES, "--data-files", "c4", "en", "train", tokenize),
        tokenize,
        batch_size=4,
        shuffle_buffer=0,
        seed=0,
        prefetch=2,
        pin_memory=pin_batches(CUDA),
    )
    try:
        batch = stream.next_batch()
        assert all(value.is_pinned() for value in batch.values())  # made ahead by the prefetch thread
        on_gpu = to_device(batch, CUDA)
        torch.cuda.synchronize()
        assert all(on_gpu[k].device == CUDA and torch.equal(on_gpu[k].cpu(), batch[k]) for k in batch)
    finally:
        stream.close()


def test_the_cuda_memory_meter_reads_the_allocators_peaks():
    model = build_model(CONFIG, seed=0).to(CUDA)
    optimizer = torch.optim.AdamW(model.parameters())
    meter = MemoryMeter(model, optimizer, CUDA)
    with meter.track():
        block = torch.empty(256 * 2**20, dtype=torch.uint8, device=CUDA)  # 0.25 GiB
        del block
    reading = meter.read_and_reset()
    assert 0.25 <= reading["peak_memory_gb"] <= reading["peak_reserved_gb"]
    assert reading["peak_weights_gb"] * GIB >= sum(p.numel() * 4 for p in model.parameters())
    with meter.excluded():  # an evaluation: kept out of the training peak
        scratch = torch.empty(2 * 2**30, dtype=torch.uint8, device=CUDA)
        del scratch
    with meter.track():
        pass
    assert meter.read_and_reset()["peak_memory_gb"] < 1.0


def test_resuming_8bit_galore_on_the_gpu_continues_the_run_and_its_peak_is_logged(
    tiny_config_file, tmp_path, real_data
):
    galore = dict(optimizer="galore_adamw", eightbit=True, rank=8, gap=2, save_every=3)
    gpu_run(tiny_config_file, tmp_path / "straight", **galore)
    gpu_run(tiny_config_file, tmp_path / "split", **{**galore, "num_training_steps": 3})
    gpu_run(tiny_config_file, tmp_path / "split", **galore, resume=True)
    # CUDA's embedding backward accumulates with atomics: equal up to bf16 rounding, not bit for bit.
    split, straight = ([r["loss"] for r in step_records(tmp_path / run)] for run in ("split", "straight"))
    assert split == pytest.approx(straight, rel=1e-3)
    (restore,) = [r for r in records(tmp_path / "split") if "restore_peak_memory_gb" in r]
    assert restore["restore_peak_memory_gb"] <= max(r["peak_memory_gb"] for r in step_records(tmp_path / "split"))


def test_layerwise_8bit_galore_on_the_gpu(tiny_config_file, tmp_path, real_data):
    trainer = gpu_run(
        tiny_config_file, tmp_path / "run", optimizer="galore_adamw", eightbit=True, layerwise=True, rank=8
    )
    assert all(p.grad is None for p in trainer.model.parameters())  # each freed in its hook
    assert len(step_records(tmp_path / "run")) == 6


# --- process groups and compilation ---------------------------------------------------------------------


def test_nccl_with_one_process(one_process_torchrun):
    env = distributed.setup()
    assert env.launched and env.device == CUDA and torch.distributed.get_backend() == "nccl"
    assert distributed.all_reduce_sum([1.5, 2.0], env) == [1.5, 2.0]  # identity for one process, no collective
    tensor = torch.ones(4, device=CUDA)
    torch.distributed.all_reduce(tensor)
    assert torch.equal(tensor, torch.ones(4, device=CUDA))


def test_fsdp_on_one_gpu_under_torchrun(tiny_config_file, tmp_path, real_data, one_process_torchrun):
    values = dict(optimizer="galore_adamw", rank=8, gap=2, proj_type="right", distributed="fsdp")
    trainer = gpu_run(tiny_config_file, tmp_path / "run", **values)
    assert distributed.is_sharded(trainer.model)
    assert len(step_records(tmp_path / "run")) == 6


def test_torch_compile_on_the_gpu(tiny_config_file, tmp_path, real_data):
    eager = gpu_run(tiny_config_file, tmp_path / "eager", dtype="fp32", num_training_steps=3)
    compiled = gpu_run(tiny_config_file, tmp_path / "compiled", dtype="fp32", num_training_steps=3, compile=True)
    assert compiled.train_model is not compiled.model
    a, b = (step_records(tmp_path / run) for run in ("eager", "compiled"))
    assert [r["loss"] for r in b] == pytest.approx([r["loss"] for r in a], rel=1e-3)
    assert eager.device == compiled.device == CUDA
