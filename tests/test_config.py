import pytest

from galore_train.config import TrainConfig, parse_token_count
from galore_train.errors import UserError
from galore_train.resume import config_differences


@pytest.mark.parametrize(
    "text, expected",
    [("1.1B", 1_100_000_000), ("13.1B", 13_100_000_000), ("500k", 500_000), ("2048", 2048), (7, 7), (None, None)],
)
def test_token_counts_with_suffixes(text, expected):
    assert parse_token_count(text) == expected


def test_bad_token_count_is_a_user_error():
    with pytest.raises(UserError, match="token count"):
        parse_token_count("lots")


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"batch_size": 0}, "--batch-size must be positive"),
        ({"scheduler": "step"}, "--scheduler must be one of"),
        ({"proj_type": "diagonal"}, "--proj-type must be one of"),
        ({"num_training_steps": None}, "--num-training-steps or --max-train-tokens"),
        ({"wandb_mode": "sometimes"}, "--wandb-mode"),
        ({"min_lr_ratio": 2.0}, "--min-lr-ratio"),
        ({"moments_dtype": "fp16"}, "--moments-dtype must be one of param, fp32"),
    ],
)
def test_validation_names_the_flag(changes, message):
    cfg = TrainConfig(num_training_steps=10).replace(**changes)
    with pytest.raises(UserError, match=message):
        cfg.validate()


def test_round_trip_through_dict():
    cfg = TrainConfig(num_training_steps=10, rank=64, tags=["a"])
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    "changes, fatal, changed",
    [
        ({"proj_group_size": 128}, ["proj_group_size: 256 -> 128"], []),  # quantized projections would be misread
        ({"proj_bits": 8}, ["proj_bits: 32 -> 8"], []),
        ({"moments_dtype": "fp32"}, ["moments_dtype: 'param' -> 'fp32'"], []),  # the saved moments' dtype
        ({"lr": 0.01, "gap": 50}, [], ["lr: 0.001 -> 0.01", "gap: 200 -> 50"]),  # take effect, with a warning
        ({"eval_every": 7, "distributed": "fsdp"}, [], []),  # run control: free
        ({"galore_targets": ["mlp", "attn"]}, [], []),  # the same set in another order
        ({"restart_warmup_steps": 100}, [], []),  # the derived default (reset 5000) stated explicitly
        ({"relora_reset": 300}, [], ["relora_reset: 5000 -> 300", "restart_warmup_steps: 100 -> 30"]),  # derived anew
        ({"apollo_proj": "svd"}, ["apollo_proj: 'random' -> 'svd'"], []),  # APOLLO's svd stores a projection
        (
            {"fira_residual": "paper", "apollo_scale_type": "tensor", "norm_growth_limit": 0},
            [],  # same state layout
            [
                "fira_residual: 'code' -> 'paper'",
                "apollo_scale_type: 'channel' -> 'tensor'",
                "norm_growth_limit: None -> 0",
            ],
        ),
    ],
)
def test_resume_differences_sort_fatal_from_warned(changes, fatal, changed):
    saved = TrainConfig(galore_targets=["attn", "mlp"])
    assert config_differences(saved.replace(**changes), saved.to_dict()) == (fatal, changed)


def test_resume_from_a_checkpoint_saved_with_the_old_fixed_warmup_default():
    """Checkpoints from before the derived default hold restart_warmup_steps=100: the same run, no warning."""
    saved = {**TrainConfig().to_dict(), "restart_warmup_steps": 100}
    assert config_differences(TrainConfig(), saved) == ([], [])
    changed = ["restart_warmup_steps: 100 -> 50"]  # an old run with 500-step cycles re-warmed for 100: now 50
    assert config_differences(TrainConfig(relora_reset=500), {**saved, "relora_reset": 500}) == ([], changed)


def test_resume_from_a_checkpoint_saved_before_moments_dtype():
    """Older checkpoints have no moments_dtype: their moments are in the weights' dtype, i.e. 'param'."""
    saved = {name: value for name, value in TrainConfig().to_dict().items() if name != "moments_dtype"}
    assert config_differences(TrainConfig(), saved) == ([], [])
    assert config_differences(TrainConfig(moments_dtype="fp32"), saved) == (["moments_dtype: 'param' -> 'fp32'"], [])
