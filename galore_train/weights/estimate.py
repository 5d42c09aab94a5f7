"""The estimator's (`galore-train memory`) checks of the weight-storage options: the same refusals as
`pretrain` (options.py), on the estimator's arguments. The bytes themselves are counted in memory/estimate.py
from weights/int8.py's formula."""

from __future__ import annotations

from types import SimpleNamespace

from galore_train.errors import UserError
from galore_train.weights.options import check_weight_options


def check_weight_estimate(
    optimizer: str,
    eightbit: bool,
    int8_weights: bool,
    int8_group_size: int,
    accumulate_projected: bool,
    layerwise: bool,
    nproc: int,
    *,
    dtype: str = "bf16",
    stochastic_rounding: bool = False,
) -> None:
    """UserError for an estimate of a run that `pretrain` would refuse."""
    check_weight_options(
        SimpleNamespace(
            optimizer=optimizer,
            eightbit=eightbit,
            int8_weights=int8_weights,
            int8_group_size=int8_group_size,
            int8_rounding="stochastic",
            accumulate_projected=accumulate_projected,
            layerwise=layerwise,
            distributed="ddp",
            dtype=dtype,
            stochastic_rounding=stochastic_rounding,
        )
    )
    if accumulate_projected and nproc > 1:
        raise UserError("--accumulate-projected runs on one process; estimate it with --nproc 1")
