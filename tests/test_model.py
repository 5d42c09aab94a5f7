import json

import pytest
import torch
from conftest import TINY_LLAMA
from transformers import LlamaConfig

from galore_train.errors import UserError
from galore_train.model import (
    build_model,
    count_parameters,
    init_weights_source,
    known_model_names,
    load_model_config,
    target_linear_modules,
)

PAPER_SIZES = {  # hidden / intermediate / layers / heads, from the GaLore paper's configs
    "llama_9m": (128, 352, 4, 4),
    "llama_20m": (256, 688, 4, 4),
    "llama_35m": (384, 1024, 6, 8),
    "llama_60m": (512, 1376, 8, 8),
    "llama_71m": (512, 1368, 12, 8),
    "llama_130m": (768, 2048, 12, 12),
    "llama_250m": (768, 2560, 24, 16),
    "llama_350m": (1024, 2736, 24, 16),
    "llama_1b": (2048, 5461, 24, 32),
    "llama_3b": (2560, 6848, 32, 32),
    "llama_7b": (4096, 11008, 32, 32),
}


def test_every_paper_size_is_shipped():
    assert set(PAPER_SIZES) <= set(known_model_names())


@pytest.mark.parametrize("name", sorted(PAPER_SIZES))
def test_configs_read_by_transformers_without_silent_drops(name):
    from galore_train.model import config_dir

    path = config_dir() / f"{name}.json"
    raw = json.loads(path.read_text())
    config = LlamaConfig.from_json_file(str(path))
    for key, value in raw.items():
        if key != "architectures":
            assert getattr(config, key) == value, key
    assert (
        config.hidden_size,
        config.intermediate_size,
        config.num_hidden_layers,
        config.num_attention_heads,
    ) == PAPER_SIZES[name]
    assert (config.vocab_size, config.hidden_act, config.rms_norm_eps, config.initializer_range) == (
        32000,
        "silu",
        1e-6,
        0.02,
    )


def test_parameter_counts_match_the_paper_names():
    millions = {
        name: count_parameters(load_model_config(name)) / 1e6
        for name in ("llama_60m", "llama_130m", "llama_350m", "llama_1b", "llama_7b")
    }
    assert 55 < millions["llama_60m"] < 65
    assert 125 < millions["llama_130m"] < 140
    assert 340 < millions["llama_350m"] < 375
    assert 1_250 < millions["llama_1b"] < 1_400  # the paper's "1B" counts 1.34B with untied embeddings
    assert 6_700 < millions["llama_7b"] < 6_800


def test_unknown_model_lists_the_known_ones():
    with pytest.raises(UserError, match="unknown model 'llama_2m'.*llama_60m"):
        load_model_config("llama_2m")


def test_bad_json_config_is_one_line_error(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"hidden_size": 64,')
    with pytest.raises(UserError, match="invalid JSON in model config"):
        load_model_config(str(path))


def test_config_missing_sizes(tmp_path):
    path = tmp_path / "partial.json"
    path.write_text('{"hidden_size": 64}')
    with pytest.raises(UserError, match="lacks intermediate_size"):
        load_model_config(str(path))


def test_build_is_seeded_and_uses_sdpa(tiny_config_file):
    config = load_model_config(tiny_config_file)
    a, b = build_model(config, seed=1), build_model(config, seed=1)
    assert all((p == q).all() for p, q in zip(a.parameters(), b.parameters()))
    assert a.config._attn_implementation == "sdpa"
    assert not (build_model(config, seed=2).lm_head.weight == a.lm_head.weight).all()


def test_targets_are_attention_and_mlp_linears_only(tiny_config_file):
    model = build_model(load_model_config(tiny_config_file), seed=0)
    names = list(target_linear_modules(model, ["attn", "mlp"]))
    assert len(names) == 2 * 7
    assert "lm_head" not in names and all(".layers." in n for n in names)
    assert list(target_linear_modules(model, ["mlp"])) == [n for n in names if ".mlp." in n]
    with pytest.raises(UserError, match="matches no linear layer"):
        target_linear_modules(model, ["cross_attn"])


def fake_run(root, steps):
    """A run folder's checkpoint layout (config.json stands for the weights); `latest` names the last step."""
    for step in steps:
        folder = root / "checkpoints" / f"step_{step:08d}"
        folder.mkdir(parents=True)
        (folder / "config.json").write_text("{}")
    (root / "checkpoints" / "latest").write_text(f"step_{steps[-1]:08d}\n")
    return root / "checkpoints" / f"step_{steps[-1]:08d}"


def test_init_from_a_run_or_its_checkpoints_folder_means_the_latest_checkpoint(tmp_path):
    latest = fake_run(tmp_path / "run", [1, 2])
    for typed in (tmp_path / "run", tmp_path / "run" / "checkpoints", latest):
        assert init_weights_source(str(typed)) == str(latest)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no model weights"):
        init_weights_source(str(tmp_path / "empty"))


@pytest.mark.parametrize("typed", ["{tmp}/missing", "./missing-run", "~/no-such-galore-run", "a/b/c", "runs/missing"])
def test_init_from_a_missing_path_says_so(tmp_path, monkeypatch, typed):
    """Not the hub's "Repo id must be in the form ...": anything that looks like a path is reported as one."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()  # "runs/missing" exists partially
    with pytest.raises(UserError, match="no such file or directory"):
        init_weights_source(typed.format(tmp=tmp_path))


@pytest.mark.parametrize("hub_id", ["gpt2", "meta-llama/Llama-2-7b-hf"])
def test_init_from_a_hub_id_goes_to_the_hub(tmp_path, monkeypatch, hub_id):
    monkeypatch.chdir(tmp_path)
    assert init_weights_source(hub_id) == hub_id


def test_a_bf16_model_is_built_in_bf16_with_the_fp32_seeded_values():
    """No fp32 copy on the host first (7B: 27 GB per process), and the same weights as fp32-then-cast."""
    from galore_train.memory.meter import StorageLedger, _RecordOutputs

    config = LlamaConfig(**TINY_LLAMA)
    ledger = StorageLedger()
    with _RecordOutputs(ledger):
        model = build_model(config, seed=0, dtype=torch.bfloat16)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    assert ledger.peak_total < 1.1 * weights  # fp32 first: 3x (fp32 model, then its bf16 copy beside it)
    reference = build_model(config, seed=0, dtype=torch.float32).to(torch.bfloat16)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))
