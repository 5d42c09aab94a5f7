"""Benchmark the GaLore optimizers on CPU, side by side with the reference package galore-torch.

    python scripts/bench_optimizer.py [--models llama_60m llama_130m] [--threads 1]

Workload: the 7 target matrices (q/k/v/o, gate/up/down) of ONE transformer block of each model (all
blocks have the same shapes, so a whole-model step is this x num_hidden_layers; the whole model is
too slow to time repeatedly here), with their real gradients: one forward/backward of the randomly
initialised model on a real C4 sequence from ../shared/data. Paper ranks: 128 (60M), 256 (130M).

Prints
  1. optimizer step time: our GaLoreAdamW vs galore-torch's vs torch AdamW. A normal step and a
     refresh step (SVD of every matrix) are timed separately and combined over gap = 200:
     amortized = (refresh + (gap - 1) x normal) / gap. Target: ours <= 0.9 x galore-torch. Also the
     "matmul floor": the two rank-r matmuls per matrix that any GaLore step must do, timed alone, and
     the lower bound on the ratio it implies (a normal step of nothing but those matmuls).
  2. projection refresh: full SVD vs randomized range finder, time and subspace similarity.
  3. optimizer-state bytes of every optimizer vs the formula (AdamW 2mn, GaLore mr + 2nr, ...).
  4. staggered refresh: max / median step time with and without --stagger-refresh.
  5. the whole model's optimizer step (every parameter, random gradients): aten operations dispatched per
     normal step (a TorchDispatchMode counts them; on a GPU each is a kernel launch), of them host reads
     (`aten._local_scalar_dense`), and CPU time: GaLoreAdamW per parameter (foreach=False) vs grouped
     (foreach=True; the default on CUDA, optim/grouped.py) vs galore-torch vs torch's foreach AdamW.
     Target: grouped <= 150 at llama_60m.
Timings are CPU seconds of this process (cpu_seconds), minima over interleaved repetitions
(fastest_of); one torch thread by default.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from galore_train.data import expand_data_files, load_tokenizer, read_c4_lines  # noqa: E402
from galore_train.model import build_model, load_model_config, target_linear_modules  # noqa: E402
from galore_train.optim import GaLoreAdafactor, GaLoreAdamW, GaLoreAdamW8bit  # noqa: E402
from galore_train.optim.galore_adamw8bit import import_bitsandbytes  # noqa: E402
from galore_train.optim.layout import EIGHTBIT_BLOCK as BLOCK_SIZE  # noqa: E402
from galore_train.optim.svd import randomized_svd_top, subspace_similarity, svd_top  # noqa: E402
from galore_train.optimizers import galore_parameter_split  # noqa: E402

SHARED_DATA = Path(os.environ.get("GALORE_TRAIN_SHARED_DATA", ROOT.parent / "shared" / "data"))
PAPER_RANKS = {"llama_60m": 128, "llama_130m": 256}
GAP = 200
Block = list[tuple[str, torch.Tensor, torch.Tensor]]  # (name, weight, gradient)


# --- workload ------------------------------------------------------------------------------------


def real_block_gradients(model_name: str, tokens: torch.Tensor) -> Block:
    """Weights and gradients of block 0's target matrices after one forward/backward on real text."""
    model = build_model(load_model_config(model_name), seed=0)
    model.train()
    loss = model(input_ids=tokens, labels=tokens).loss
    loss.backward()
    targets = target_linear_modules(model, ["attn", "mlp"])
    block = [
        (name, module.weight.detach().clone(), module.weight.grad.clone())
        for name, module in targets.items()
        if name.startswith("model.layers.0.")
    ]
    del model
    return block


def c4_tokens(length: int) -> torch.Tensor:
    tokenizer = load_tokenizer(str(SHARED_DATA / "t5-tokenizer"))
    text = " ".join(
        doc["text"]
        for _, doc in zip(
            range(20), read_c4_lines(expand_data_files(str(SHARED_DATA / "c4" / "train" / "*.json.gz"), "data"))
        )
    )
    ids = tokenizer(text)["input_ids"][:length]
    return torch.tensor([ids])


def fresh_params(block: Block) -> list[nn.Parameter]:
    params = []
    for _, weight, grad in block:
        p = nn.Parameter(weight.clone())
        p.grad = grad
        params.append(p)
    return params


def galore_group(params: list[nn.Parameter], rank: int, gap: int, **extra) -> list[dict]:
    return [{"params": params, "rank": rank, "update_proj_gap": gap, "scale": 0.25, "proj_type": "std", **extra}]


def reference_galore_adamw(params: list[nn.Parameter], rank: int, gap: int) -> torch.optim.Optimizer:
    import galore_torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return galore_torch.GaLoreAdamW(galore_group(params, rank, gap), lr=1e-3, eps=1e-8, no_deprecation_warning=True)


def cpu_seconds(call: Callable[[], object]) -> float:
    """CPU time of this process for one call. With one torch thread all the work runs in this process
    and time spent waiting for other processes on a shared machine is not counted (wall time is)."""
    start = time.process_time()
    call()
    return time.process_time() - start


def fastest_of(steps: dict[str, Callable[[], object]], reps: int) -> dict[str, float]:
    """Minimum CPU seconds per call over `reps` rounds that alternate between the contenders, so that
    cache and frequency effects of the machine's load hit all of them alike."""
    best = {name: math.inf for name in steps}
    for _ in range(reps):
        for name, step in steps.items():
            best[name] = min(best[name], cpu_seconds(step))
    return best


def warmed(optimizer: torch.optim.Optimizer, steps: int = 2) -> torch.optim.Optimizer:
    for _ in range(steps):
        optimizer.step()
    return optimizer


# --- 1. step time -----------------------------------------------------------------------------------


def matmul_floor(block: Block, rank: int) -> Callable[[], None]:
    """The two rank-r matmuls per matrix that every GaLore step must do (project G, project the update
    back into W), alone: the floor under any implementation's normal step."""
    work = []
    for _, weight, grad in block:
        m, n = grad.shape
        right = m >= n  # the side "std" projects
        basis = torch.linalg.qr(torch.randn(n if right else m, rank)).Q
        work.append((weight.clone(), grad, basis.mT.contiguous() if right else basis, right))

    def step() -> None:
        for weight, grad, basis, right in work:
            if right:
                weight.addmm_(grad @ basis.mT, basis, alpha=-1e-6)
            else:
                weight.addmm_(basis, basis.mT @ grad, alpha=-1e-6)

    return step


def bench_step_time(block: Block, rank: int, reps: int, refresh_reps: int) -> dict[str, float]:
    never, always = 10**9, 1  # gap that never / always refreshes after the first step
    normal = fastest_of(
        {
            "ours": warmed(GaLoreAdamW(galore_group(fresh_params(block), rank, never), lr=1e-3)).step,
            "galore-torch": warmed(reference_galore_adamw(fresh_params(block), rank, never)).step,
            "adamw": warmed(torch.optim.AdamW(fresh_params(block), lr=1e-3)).step,
            "matmul floor": matmul_floor(block, rank),
        },
        reps,
    )
    refresh = fastest_of(
        {
            "ours": warmed(GaLoreAdamW(galore_group(fresh_params(block), rank, always), lr=1e-3), 1).step,
            "galore-torch": warmed(reference_galore_adamw(fresh_params(block), rank, always), 1).step,
        },
        refresh_reps,
    )
    results = {f"{name} normal": seconds for name, seconds in normal.items()}
    for name, seconds in refresh.items():
        results[f"{name} refresh"] = seconds
        results[f"{name} amortized"] = (seconds + (GAP - 1) * normal[name]) / GAP
    return results


# --- 2. SVD -------------------------------------------------------------------------------------------


def bench_svd(block: Block, rank: int) -> list[tuple[str, tuple[int, int], float, float, float]]:
    rows = []
    for name, _, grad in block:
        timings = fastest_of(
            {"full": lambda g=grad: svd_top(g, rank), "randomized": lambda g=grad: randomized_svd_top(g, rank, seed=0)},
            3,
        )
        exact, approx = svd_top(grad, rank), randomized_svd_top(grad, rank, seed=0)
        m, n = grad.shape
        side = 0 if m < n else 1  # the side "std" projects: left singular vectors when m < n
        pick = (lambda top: top[0]) if side == 0 else (lambda top: top[1].mT)
        rows.append(
            (
                name.split(".")[-1],
                (m, n),
                timings["full"],
                timings["randomized"],
                subspace_similarity(pick(exact), pick(approx)),
            )
        )
    return rows


# --- 3. state bytes -----------------------------------------------------------------------------------


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of per-parameter state tensors, excluding step counters and bitsandbytes' two shared
    256-entry quantization maps (qmap1/qmap2: 2 KiB per optimizer, not per parameter)."""
    total = 0
    for state in optimizer.state.values():
        for key, value in state.items():
            if torch.is_tensor(value) and key not in ("step", "qmap1", "qmap2"):
                total += value.untyped_storage().nbytes()
    return total


def state_formulas(shapes: list[tuple[int, int]], rank: int) -> dict[str, int]:
    """Paper-style byte counts per optimizer: fp32 = 4 bytes, 8-bit = 1 byte + one fp32 absmax per 256."""

    def eightbit(elements: int) -> int:
        return 2 * elements + 2 * math.ceil(elements / BLOCK_SIZE) * 4

    formulas = {
        "adamw": 0,
        "adam": 0,
        "adafactor": 0,
        "adam8bit": 0,
        "galore_adamw": 0,
        "galore_adafactor": 0,
        "galore_adamw8bit": 0,
    }
    for shape in shapes:
        small, large = min(shape), max(shape)  # std: the projection is small x r, moments r x large
        formulas["adamw"] += 4 * 2 * small * large
        formulas["adam"] += 4 * 2 * small * large
        formulas["adafactor"] += 4 * (small + large)
        formulas["adam8bit"] += eightbit(small * large)
        formulas["galore_adamw"] += 4 * (small * rank + 2 * large * rank)
        formulas["galore_adafactor"] += 4 * (small * rank + rank + large)
        formulas["galore_adamw8bit"] += 4 * small * rank + eightbit(large * rank)
    return formulas


def bench_state_bytes(block: Block, rank: int) -> list[tuple[str, int, int]]:
    bnb = import_bitsandbytes()
    builders = {
        "adamw": lambda ps: torch.optim.AdamW(ps),
        "adam": lambda ps: torch.optim.Adam(ps),
        "adafactor": lambda ps: GaLoreAdafactor(ps),
        "adam8bit": lambda ps: bnb.optim.AdamW8bit(ps),
        "galore_adamw": lambda ps: GaLoreAdamW(galore_group(ps, rank, GAP)),
        "galore_adafactor": lambda ps: GaLoreAdafactor(galore_group(ps, rank, GAP)),
        "galore_adamw8bit": lambda ps: GaLoreAdamW8bit(galore_group(ps, rank, GAP)),
    }
    formulas = state_formulas([tuple(w.shape) for _, w, _ in block], rank)
    return [
        (name, state_bytes(warmed(build(fresh_params(block)), 1)), formulas[name]) for name, build in builders.items()
    ]


# --- 4. staggered refresh ------------------------------------------------------------------------------


def bench_stagger(block: Block, rank: int) -> dict[bool, list[float]]:
    """Step times over two refresh windows (gap = number of matrices), first step excluded."""
    gap = len(block)
    optimizers = {
        stagger: GaLoreAdamW(galore_group(fresh_params(block), rank, gap, stagger_refresh=stagger), lr=1e-3)
        for stagger in (False, True)
    }
    for optimizer in optimizers.values():
        optimizer.step()  # step 0 refreshes every matrix either way
    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(2 * gap):
        for stagger, optimizer in optimizers.items():
            times[stagger].append(cpu_seconds(optimizer.step))
    return times


# --- 5. dispatched operations, whole model ---------------------------------------------------------------


class DispatchCount(TorchDispatchMode):
    """Counts the aten operations dispatched inside the block, and of them the host reads of a tensor's value."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0
        self.host_reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        self.host_reads += func is torch.ops.aten._local_scalar_dense.default
        return func(*args, **(kwargs or {}))


def model_parameters(model_name: str) -> tuple[list[tuple[str, torch.Tensor]], list[tuple[str, torch.Tensor]]]:
    """(GaLore targets, others) of the model, (name, random gradient) each: the shapes from a meta-device model,
    the values seeded (an optimizer's operation count and normal-step time do not depend on them)."""
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(load_model_config(model_name))
    generator = torch.Generator().manual_seed(0)
    galore, plain = galore_parameter_split(model, ["attn", "mlp"])
    return tuple([(name, torch.randn(p.shape, generator=generator)) for name, p in part] for part in (galore, plain))


def whole_model_optimizers(
    model_name: str, rank: int, names: Optional[list[str]] = None
) -> dict[str, torch.optim.Optimizer]:
    """The contenders (`names`, default all), each on its own weights (sharing the gradients, which none of them
    writes), warmed up with a projection that is never refreshed again: every timed or counted step is normal."""
    galore, plain = model_parameters(model_name)

    def params(named: list[tuple[str, torch.Tensor]]) -> list[nn.Parameter]:
        out = []
        for _, grad in named:
            p = nn.Parameter(torch.randn_like(grad) * 0.02)
            p.grad = grad
            out.append(p)
        return out

    def groups() -> list[dict]:
        return [{"params": params(plain)}, *galore_group(params(galore), rank, 10**9)]

    def galore_torch() -> torch.optim.Optimizer:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            import galore_torch

            return galore_torch.GaLoreAdamW(groups(), lr=1e-3, no_deprecation_warning=True)

    builders = {
        "GaLoreAdamW, per parameter": lambda: GaLoreAdamW(groups(), lr=1e-3, foreach=False),
        "GaLoreAdamW, grouped": lambda: GaLoreAdamW(groups(), lr=1e-3, foreach=True),
        "galore-torch GaLoreAdamW": galore_torch,
        "torch AdamW, foreach": lambda: torch.optim.AdamW(
            [p for g in groups() for p in g["params"]], lr=1e-3, foreach=True
        ),
    }
    return {name: warmed(build()) for name, build in builders.items() if names is None or name in names}


def count_dispatched(step: Callable[[], object]) -> DispatchCount:
    counter = DispatchCount()
    with counter:
        step()
    return counter


def bench_dispatch(model_name: str, rank: int, reps: int) -> dict[str, tuple[int, int, float]]:
    """Per contender: (aten ops, host reads, CPU seconds) of one normal step of the whole model's optimizer."""
    optimizers = whole_model_optimizers(model_name, rank)
    counts = {name: count_dispatched(optimizer.step) for name, optimizer in optimizers.items()}
    times = fastest_of({name: optimizer.step for name, optimizer in optimizers.items()}, reps)
    return {name: (counts[name].ops, counts[name].host_reads, times[name]) for name in optimizers}


# --- main ---------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(PAPER_RANKS), choices=list(PAPER_RANKS))
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (default 1: stable timings on a shared machine)"
    )
    parser.add_argument("--reps", type=int, default=20, help="timed normal steps per optimizer")
    parser.add_argument("--refresh-reps", type=int, default=3, help="timed refresh steps per optimizer")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    tokens = c4_tokens(256)
    print(
        f"torch {torch.__version__}, {args.threads} thread(s); workload: block 0 of each model, gradients from one"
        " real "
        f"C4 sequence of {tokens.shape[1]} tokens; gap {GAP}, scale 0.25, proj_type std\n"
    )

    for model_name in args.models:
        rank = PAPER_RANKS[model_name]
        block = real_block_gradients(model_name, tokens)
        shapes = ", ".join(f"{tuple(w.shape)}" for _, w, _ in block)
        print(f"=== {model_name}, rank {rank}: {len(block)} matrices {shapes}")

        t = bench_step_time(block, rank, args.reps, args.refresh_reps)
        print(f"\n1. step time (ms, one block){'':18}normal    refresh   amortized over gap {GAP}")
        for name in ("ours", "galore-torch"):
            print(
                f"   GaLoreAdamW {name:<28}{t[f'{name} normal'] * 1e3:8.1f}  {t[f'{name} refresh'] * 1e3:9.1f} "
                f" {t[f'{name} amortized'] * 1e3:9.1f}"
            )
        print(f"   torch AdamW {'':28}{t['adamw normal'] * 1e3:8.1f}")
        floor = t["matmul floor normal"]
        print(
            f"   matmul floor (2 rank-{rank} GEMMs/matrix) {floor * 1e3:8.1f}   -> time above it: ours "
            f"{(t['ours normal'] - floor) * 1e3:.1f} ms, galore-torch {(t['galore-torch normal'] - floor) * 1e3:.1f} ms"
        )
        print(
            f"   ours / galore-torch: normal {t['ours normal'] / t['galore-torch normal']:.3f}, refresh "
            f"{t['ours refresh'] / t['galore-torch refresh']:.3f}, amortized"
            f" {t['ours amortized'] / t['galore-torch amortized']:.3f}"
            f"  (target <= 0.9)"
        )
        bound = (floor + t["ours refresh"] / GAP) / t["galore-torch amortized"]
        print(
            f"   lower bound with this refresh: (matmul floor + ours refresh / {GAP}) / galore-torch amortized ="
            f" {bound:.3f}"
            f"  (nothing but the GEMMs in a normal step)"
        )
        print(f"   GaLore (ours, amortized) / AdamW: {t['ours amortized'] / t['adamw normal']:.2f}")

        print("\n2. projection refresh: full SVD vs randomized (rank + 8 columns, 2 power iterations)")
        print(f"   {'matrix':<10}{'shape':<14}{'full ms':>9}{'rand ms':>9}{'speed-up':>10}{'similarity':>12}")
        for name, shape, full, rand, similarity in bench_svd(block, rank):
            print(
                f"   {name:<10}{str(shape):<14}{full * 1e3:9.1f}{rand * 1e3:9.1f}{full / rand:9.2f}x{similarity:12.4f}"
            )
        print("   similarity = mean squared cosine of the principal angles between the top-r subspaces (1 = identical)")

        print("\n3. optimizer state bytes (one block)")
        print(f"   {'optimizer':<18}{'measured':>12}{'formula':>12}  equal   vs AdamW")
        rows = bench_state_bytes(block, rank)
        adamw_bytes = rows[0][1]
        for name, measured, formula in rows:
            print(
                f"   {name:<18}{measured:12,d}{formula:12,d} "
                f" {'yes' if measured == formula else 'NO ':<6}{measured / adamw_bytes:8.3f}"
            )
        print(
            "   formulas per m x n matrix (fp32 = 4 B): AdamW/Adam 2mn; Adafactor m + n; GaLore-AdamW mr + 2nr with"
            " m <= n;\n"
            "   GaLore-Adafactor mr + r + n; 8-bit moments 1 B/element + one fp32 absmax per 256 elements"
        )

        times = bench_stagger(block, rank)
        print(
            f"\n4. staggered refresh (gap {len(block)} = one SVD per step when staggered; {2 * len(block)} steps"
            " after step 0)"
        )
        for stagger in (False, True):
            print(
                f"   stagger {'on ' if stagger else 'off'}: max step {max(times[stagger]) * 1e3:8.1f} ms, "
                f"median {statistics.median(times[stagger]) * 1e3:7.1f} ms, total {sum(times[stagger]):6.2f} s"
            )

        dispatched = bench_dispatch(model_name, rank, max(1, args.reps // 4))
        galore, plain = model_parameters(model_name)
        print(
            f"\n5. whole-model optimizer step ({len(galore)} GaLore matrices + {len(plain)} other parameters),"
            " a normal step"
        )
        print(f"   {'optimizer':<30}{'aten ops':>9}{'host reads':>12}{'CPU ms':>9}{'vs per parameter':>18}")
        base = dispatched["GaLoreAdamW, per parameter"][2]
        for name, (ops, reads, seconds) in dispatched.items():
            print(f"   {name:<30}{ops:9d}{reads:12d}{seconds * 1e3:9.1f}{seconds / base:17.3f}x")
        print()
    print(f"total bench time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
