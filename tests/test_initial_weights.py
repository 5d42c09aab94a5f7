"""A LLaMA built on the meta device and filled on its device (galore_train/initial_weights.py): transformers'
init distribution, the rotary buffers of a host-built model, values independent of the fill order and of FSDP2
sharding (2 processes, gloo: gathered bit-for-bit against one process). That the host holds no second copy
while building: tests/test_model.py."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_LLAMA
from transformers import LlamaConfig, LlamaForCausalLM

from galore_train import initial_weights
from galore_train.model import build_model, meta_llama

# Rows that do not split evenly over 2 ranks (1001 and 33): DTensor's uneven shards.
UNEVEN = {**TINY_LLAMA, "vocab_size": 1001, "hidden_size": 32, "intermediate_size": 33, "attention_bias": True}


def test_values_follow_transformers_init_for_llama():
    """normal(0, initializer_range) weights, padding row 0, RMSNorm ones, biases zeros: what `_init_weights` does."""
    config = LlamaConfig(**{**TINY_LLAMA, "attention_bias": True, "initializer_range": 0.05})
    model = build_model(config, seed=0)
    for name, param in model.named_parameters():
        if name.endswith(".bias"):
            assert (param == 0).all(), name
        elif "norm" in name:
            assert (param == 1).all(), name
        else:
            values = param[1:] if "embed_tokens" in name else param
            assert values.std().item() == pytest.approx(0.05, rel=0.05), name
            assert abs(values.mean().item()) < 0.01, name
    assert (model.model.embed_tokens.weight[config.pad_token_id] == 0).all()


def test_tied_embeddings_stay_one_parameter():
    """`to_empty` alone would untie lm_head from embed_tokens (two tensors, lm_head never filled)."""
    model = build_model(LlamaConfig(**{**TINY_LLAMA, "tie_word_embeddings": True}), seed=0)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert (model.lm_head.weight[0] == 0).all() and model.lm_head.weight.std().item() == pytest.approx(0.02, rel=0.05)


def test_rotary_buffers_equal_a_host_built_models():
    config = LlamaConfig(**{**TINY_LLAMA, "rope_theta": 500000.0})
    host = LlamaForCausalLM._from_config(LlamaConfig(**{**TINY_LLAMA, "rope_theta": 500000.0}))
    model = build_model(config, seed=0)
    buffers = dict(model.named_buffers())
    assert sorted(buffers) == ["model.rotary_emb.inv_freq", "model.rotary_emb.original_inv_freq"]
    for name, value in host.named_buffers():
        assert torch.equal(buffers[name], value), name


def test_a_parameter_does_not_depend_on_the_others_or_the_fill_order(monkeypatch: pytest.MonkeyPatch):
    """Each parameter has its own generator: a model with one more layer starts with the same layers, and
    filling in reverse module order writes the same values."""
    two = build_model(LlamaConfig(**TINY_LLAMA), seed=3)
    three = build_model(LlamaConfig(**{**TINY_LLAMA, "num_hidden_layers": 3}), seed=3)
    shared = dict(three.named_parameters())
    assert all(torch.equal(p, shared[name]) for name, p in two.named_parameters())
    in_order = initial_weights._owned_parameters
    monkeypatch.setattr(initial_weights, "_owned_parameters", lambda model: reversed(list(in_order(model))))
    backwards = initial_weights.fill_weights(meta_llama(LlamaConfig(**TINY_LLAMA)), torch.device("cpu"), 3)
    assert all(torch.equal(a, b) for a, b in zip(backwards.parameters(), two.parameters()))
    assert not torch.equal(build_model(LlamaConfig(**TINY_LLAMA), seed=4).lm_head.weight, two.lm_head.weight)


def test_fsdp_on_two_ranks_holds_exactly_the_shards_of_the_one_process_model(tmp_path: Path):
    from test_distributed import torchrun_ok

    torchrun_ok(__file__, str(tmp_path))
    reference = build_model(LlamaConfig(**UNEVEN), seed=7)
    expected = {**reference.state_dict(), **dict(reference.named_buffers())}
    for rank in range(2):
        held = torch.load(tmp_path / f"rank{rank}.pt")
        assert 0.45 < held["local_numel"] / reference.num_parameters() < 0.55  # each rank filled its half
        assert held["buffers"].keys() == dict(reference.named_buffers()).keys()
        for name, value in held["buffers"].items():
            assert torch.equal(value, expected[name]), name
    gathered = torch.load(tmp_path / "gathered.pt")
    assert gathered.keys() == reference.state_dict().keys()
    for name, value in gathered.items():
        assert torch.equal(value, expected[name]), name


def _worker(out: Path) -> None:
    """Under torchrun: shard a meta-built model with FSDP2 (each decoder layer, then the root), fill the
    shards, and save what the rank holds and the gathered full weights."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model = meta_llama(LlamaConfig(**UNEVEN))
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    initial_weights.fill_weights(model, torch.device("cpu"), 7)
    local_numel = sum(p.to_local().numel() for p in model.parameters())
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    torch.save({"local_numel": local_numel, "buffers": buffers}, out / f"rank{rank}.pt")
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        torch.save(full, out / "gathered.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
