"""APOLLO-AdamW and APOLLO-Mini (Zhu et al. 2024, arXiv 2412.05270), written from the paper's equations.

AdamW's update is the gradient times an element-wise scaling; APOLLO coarsens it to one factor per
channel (or per tensor) and estimates the factors from Adam moments of a low-rank projection only.
Per APOLLO parameter (m x n) and step t:

    R_t  = P_t^T G_t  (left)  or  G_t Q_t^T  (right)   projection as in GaLore (projector.py sides), from
                                                     a seeded Gaussian with entries N(0, 1/r) ("random",
                                                     no SVD) or GaLore's SVD projector ("svd")
    N'_t = M_t / (sqrt(V_t) + eps)                   raw Adam direction of R_t, no bias correction
                                                     (moments r x n or m x r; galore_adamw.py)
    s_t  = ||N'_t[:, j]|| / ||R_t[:, j]||            per channel j ("channel"; channels as in fira.py)
           ||N'_t|| / ||R_t||                        or one factor ("tensor")
    U_t  = scale * G_t diag(s_t), limited            the raw full-rank gradient, scaled; norm-growth
                                                     limiter (norm_growth.py, gamma = 1.01), before the
                                                     bias correction
    W_t  = (1 - lr wd) W_{t-1} - lr k_t U_t          k_t = sqrt(1 - b2^t) / (1 - b1^t)

The limiter's place, the bias correction after it and eps on the uncorrected sqrt(V) (default 1e-6) are
the authors' (read for the numbers only: their code is CC-BY-NC); tests/test_apollo_reference.py re-derives
the update independently. A constant `scale` before or after the limiter is the same update (the limiter
compares ratios of norms), so their `--scale_front` needs no counterpart.

Nothing is projected back: the projection only feeds the moments that estimate s. U is applied with one
broadcasting multiply-accumulate (no m x n temporary); its norm for the limiter follows from the channel
norms of G: ||G diag(s)||^2 = sum_j s_j^2 ||G[:, j]||^2.

The Gaussian projection is regenerated, never stored in the optimizer state: its seed is a hash of
(proj_seed, the parameter's position in the optimizer, the refresh window (step + refresh_offset) //
update_proj_gap), so a refresh every update_proj_gap steps draws a new one. It is drawn in float32 by a
seeded CPU generator and then moved to the gradient's device and dtype: CUDA's Philox output depends on the
card's multiprocessor count once a draw exceeds one wave (pytorch issues #62467, #87992), so a generator on
the device would give DDP ranks on different GPU models or MIG slices different matrices (silent drift) and
change P mid-window on a resume elsewhere. The CPU draw is the same on every process and machine. On an
accelerator the window's matrix is kept in host memory (drawn once per window, copied each step), so the
device memory and the state stay as stated; on a CPU device it is drawn each step (no copy kept).

Defaults: apollo_adamw scale 1 (the paper's APOLLO); APOLLO-Mini is rank 1, tensor-wise, scale sqrt(128)
(MINI_SCALE): an Adam direction of r x n entries of size ~1 has norm ~sqrt(r n) where the full-rank one
has ~sqrt(m n), so a rank-r ratio is ~sqrt(r / m) of AdamW's; the paper compensates rank 1 with this fixed
gradient scale factor. The authors' package square-roots its `scale` (it multiplies by sqrt(scale): their
`scale 128` is our sqrt(128), their 130M APOLLO-Mini script's 192 our sqrt(192)); here `scale` is the
factor itself.

FSDP2 (row shards, row_shards.py; right projections only): each rank projects its rows of G with the same Q
(drawn for the whole shape), so R's rows, the moments' rows and per-row ("channel") factors are local; the
sums over rows go through one all-reduce per matrix and step: the limiter's squared norm (channel), or the
three squared norms of R, N' and G (tensor, APOLLO-Mini). Each rank keeps its rows of the moments.

State per APOLLO parameter: the two moments (r x n or m x r, gradient dtype), the limiter's float32
scalar and, with proj "svd" only, the projection. APOLLO-Mini: 2 max(m, n) + 1 values (O(m + n)).
"""

from __future__ import annotations

import hashlib
import math
from typing import Any, Iterable, Mapping, Optional

import torch
from torch import Tensor

from galore_train.optim.base import GALORE_GROUP_DEFAULTS, GaLoreOptimizer
from galore_train.optim.fira import (
    channel_dim,
    channel_squares,
    check_one_sided,
    norm_ratio,
    whole_over_rows,
)
from galore_train.optim.galore_adamw import GaLoreAdamW, adam_defaults
from galore_train.optim.layout import StateTensor
from galore_train.optim.norm_growth import (
    DEFAULT_LIMIT,
    check_norm_growth_limit,
    limiter_layout,
    norm_growth_factor,
)
from galore_train.optim.projector import GaLoreProjector
from galore_train.optim.row_shards import sum_over_rows

PROJECTIONS = ("random", "svd")
SCALE_TYPES = ("channel", "tensor")
APOLLO_SCALE = 1.0
MINI_SCALE = math.sqrt(128)


def projection_seed(seed: int, position: int, window: int) -> int:
    """A 63-bit generator seed for (seed, parameter position, refresh window), the same in every process."""
    digest = hashlib.blake2b(f"{seed}:{position}:{window}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def gaussian_projection(
    shape: torch.Size, side: str, rank: int, seed: int, device: torch.device, dtype: torch.dtype
) -> Tensor:
    """P (m x r, side "left") or Q (r x n, "right") with N(0, 1/r) entries: E[P P^T] = I, so ||R|| ~ ||G||."""
    m, n = shape
    generator = torch.Generator().manual_seed(seed)  # CPU: the same numbers on every machine (module docstring)
    size = (m, rank) if side == "left" else (rank, n)
    matrix = torch.randn(size, generator=generator, dtype=torch.float32)
    return matrix.div_(math.sqrt(rank)).to(device=device, dtype=dtype)


class ApolloAdamW(GaLoreAdamW):
    """AdamW whose GaLore-style groups ("rank" key) run APOLLO; other groups run AdamW exactly.

    Param-group keys: GaLore's (rank, update_proj_gap, scale, proj_type, ...) plus `proj` ("random" |
    "svd"), `scale_type` ("channel" | "tensor"), `norm_growth_limit` (gamma, or None for off) and
    `proj_seed`. Example (APOLLO-Mini):
        ApolloAdamW([{"params": others},
                     {"params": matrices, "rank": 1, "scale": MINI_SCALE, "scale_type": "tensor"}], lr=1e-2)
    """

    EPS_ON_CORRECTED_V = False  # the authors': M / (sqrt(V) + eps)
    ACCUMULATES_PROJECTED = False  # the update reads the full gradient p.grad

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        proj: str = "random",
        scale_type: str = "channel",
        norm_growth_limit: Optional[float] = DEFAULT_LIMIT,
        proj_seed: int = 0,
    ) -> None:
        self._positions: dict[Tensor, int] = {}  # parameter -> position in the optimizer (seeds)
        self._host_projections: dict[Tensor, tuple[int, Tensor]] = {}  # accelerators: (window, CPU matrix)
        defaults = {
            **adam_defaults(lr, betas, eps, weight_decay),
            "proj": proj,
            "scale_type": scale_type,
            "norm_growth_limit": norm_growth_limit,
            "proj_seed": proj_seed,
        }
        GaLoreOptimizer.__init__(self, params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if "rank" in param_group:
            param_group.setdefault("scale", APOLLO_SCALE)  # before GaLore's default (0.25) fills it
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        for p in group["params"]:
            self._positions[p] = len(self._positions)
        if group["proj"] not in PROJECTIONS:
            raise ValueError(f"unknown APOLLO proj {group['proj']!r}; known: {', '.join(PROJECTIONS)}")
        if group["scale_type"] not in SCALE_TYPES:
            raise ValueError(f"unknown APOLLO scale_type {group['scale_type']!r}; known: {', '.join(SCALE_TYPES)}")
        check_norm_growth_limit(group["norm_growth_limit"])
        if "rank" not in group:
            return
        check_one_sided(group, "APOLLO")
        if group["proj"] == "random" and (group["adaptive_gap"] or group["proj_bits"] != 32 or group["svd"] != "full"):
            raise ValueError(
                "APOLLO's random projection is regenerated, not stored, and takes no SVD: adaptive_gap, proj_bits "
                "and svd apply to proj 'svd' only (--apollo-proj svd)"
            )

    @classmethod
    def state_layout(cls, shape: tuple[int, ...], group: Mapping[str, Any], itemsize: int) -> list[StateTensor]:
        """APOLLO groups: the moments of R and the limiter's scalar, plus GaLore's projection with proj "svd"
        only (the random one is regenerated each step); other groups: AdamW's moments."""
        if "rank" not in group or group.get("proj", "random") == "svd":
            layout = super().state_layout(shape, group, itemsize)
        else:
            projector = GaLoreProjector.from_group({**GALORE_GROUP_DEFAULTS, **group})
            layout = cls._moment_layout(projector.low_rank_shape(shape), group, itemsize)
        return layout + limiter_layout(group) if "rank" in group else layout

    def _uses_projector(self, group: dict[str, Any]) -> bool:
        return "rank" in group and group["proj"] == "svd"

    def _project(
        self, p: Tensor, grad: Tensor, group: dict[str, Any], projector: GaLoreProjector, name: Optional[str]
    ) -> Optional[Tensor]:
        """R of `grad` (p's gradient, or under FSDP2 this rank's rows of it) in this window's random projection
        (a scratch buffer, as GaLore's); with proj "svd", GaLore's projection. The matrix is drawn for p's whole
        shape, so a right one (r x n) is the same for every rank's rows."""
        if group["proj"] != "random":
            return super()._project(p, grad, group, projector, name)
        state, side = self.state[p], projector.side(p.shape)
        window = (state.get("step", 0) + state.get("refresh_offset", 0)) // projector.update_proj_gap
        matrix = self._projection(p, grad, side, projector.rank, group["proj_seed"], window)
        out = self._scratch_buffer(projector.low_rank_shape(grad.shape), grad)
        return torch.mm(matrix.mT, grad, out=out) if side == "left" else torch.mm(grad, matrix.mT, out=out)

    def _projection(self, p: Tensor, grad: Tensor, side: str, rank: int, proj_seed: int, window: int) -> Tensor:
        """This window's Gaussian projection of `p`, on the gradient's device and in its dtype (module docstring)."""
        device, dtype = grad.device, grad.dtype
        seed = projection_seed(proj_seed, self._positions[p], window)
        if device.type == "cpu":
            return gaussian_projection(p.shape, side, rank, seed, device, dtype)
        cached = self._host_projections.get(p)
        if cached is None or cached[0] != window:
            cached = self._host_projections[p] = (window, gaussian_projection(p.shape, side, rank, seed, "cpu", dtype))
        return cached[1].to(device)

    def _update(self, p: Tensor, grad: Tensor, group: dict[str, Any], state: dict[str, Any]) -> None:
        if "rank" not in group:
            super()._update(p, grad, group, state)
            return
        dim = channel_dim(GaLoreProjector.from_group(group).side(p.shape)) if group["scale_type"] == "channel" else None
        gradient, limit = self._gradient_rows(p), group["norm_growth_limit"]
        projected = channel_squares(grad, dim)  # before the Adam direction overwrites R's buffer
        normalized, c1, c2 = self._adam_direction(grad, group, state)  # N', before the bias correction
        limited = limit is not None
        squares = (projected, channel_squares(normalized, dim)) + ((channel_squares(gradient, dim),) if limited else ())
        projected, adam, *full = whole_over_rows(self._shard, dim, *squares)  # one all-reduce under FSDP2 at most
        factors = norm_ratio(adam.sqrt_(), projected.sqrt_()) * group["scale"]
        if limited:  # ||G diag(s)||^2 = sum_j s_j^2 ||G[:, j]||^2
            update_square = full[0].mul(factors.square()).sum()
            if dim == 1:  # per-row factors: this rank's rows' part of the sum
                (update_square,) = sum_over_rows(self._shard, update_square)
            factors = factors * norm_growth_factor(update_square.sqrt(), state, limit)
        decay = 1.0 - group["lr"] * group["weight_decay"]
        if decay != 1.0:
            p.mul_(decay)
        p.addcmul_(gradient, factors.to(p.dtype), value=-group["lr"] * c2 / c1)  # bias correction after the limiter
