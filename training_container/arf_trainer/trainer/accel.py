"""The GPU path of the built-in recipes: where the data sits, how losses are summed, mixed
precision and compilation, and what each costs in bitwise reproducibility.

On a CPU none of this changes what the loop computes (the same weights, bit for bit, as a loop
without it), so the CPU tests of reproducibility hold the loop to it. On CUDA:

* **data placement** (`choose_placement`, recorded as the MLflow param ``data_placement``):
  ``device`` when the in-memory training and validation tensors take at most
  `DEVICE_SHARE` of the GPU's free memory: they are copied once and every step only indexes
  them there (the epoch's order too: one copy an epoch); else ``pinned``: each batch is put in
  page-locked memory and copied with ``non_blocking=True``, so the copy does not wait for the
  GPU to drain (a copy from pageable memory synchronizes the stream first). ``host``: the
  device is the CPU, batches stay where they are.
* **losses** (`LossSum`): the step's loss is added to a float64 sum on the device; the host
  reads it once an epoch (the log interval), at a checkpoint and at a preemption stop: no
  ``loss.item()`` sync per step. float32 -> float64 is exact and float64 arithmetic is the same
  on the device as in Python, so the logged values equal the per-step ``.item()`` ones.
* **precision** (`autocast`): ``bf16`` runs the forward pass and the loss under
  ``torch.autocast(device.type, torch.bfloat16)``; weights, gradients and the optimizer stay
  float32.
* **compile** (`compiled`): ``torch.compile`` of the trained core, with Inductor's
  deterministic mode (no on-device benchmarking that changes numerics).
* **determinism** (config.deterministic): on by default; ``training.deterministic: false``
  allows nondeterministic kernels, cuDNN autotuning and Inductor's benchmarking for speed, and
  the run is then recorded as not bitwise reproducible.

`bitwise_record` says, for the run's record, whether a configuration is known to give the same
weights bit for bit when rerun on the same machine, and why (measured, or not verified).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from arf_trainer.trainer.data import Inputs

DEVICE_SHARE = 0.5
"""Data kept on the GPU may take at most this share of its free memory (the rest: the model,
activations, optimizer state, the compiler's workspace)."""


@dataclass(frozen=True)
class Placement:
    """Where the training data sits while the loop runs, and why (see the module docstring)."""

    mode: str
    """device | pinned | host"""
    why: str
    device: torch.device

    def move(self, value: Inputs) -> Inputs:
        """A batch (a tensor or a dict of tensors) on the run's device."""
        if isinstance(value, dict):
            return {k: self.move(v) for k, v in value.items()}
        if self.mode == "pinned" and value.device.type == "cpu":
            return value.pin_memory().to(self.device, non_blocking=True)
        return value.to(self.device)  # device: already there; host: the CPU, a no-op

    @property
    def label(self) -> str:
        return f"{self.mode} ({self.why})"


def choose_placement(device: torch.device, loading: str, data_bytes: int,
                     free_bytes: int | None) -> Placement:
    """The placement of a run's data: a pure function of what it is given, so it is tested
    without a GPU. `data_bytes`: the in-memory loader's tensors (train + validation);
    `free_bytes`: the device's free memory (None on the CPU)."""
    if device.type == "cpu":
        return Placement("host", "the device is the CPU", device)
    if loading != "memory":
        return Placement("pinned", f"{loading} loading reads batches from the shards", device)
    budget = int((free_bytes or 0) * DEVICE_SHARE)
    mib = f"{data_bytes / 2**20:.1f} MiB of tensors vs {budget / 2**20:.0f} MiB"
    if data_bytes <= budget:
        return Placement("device", f"{mib} ({DEVICE_SHARE:.0%} of free {device} memory)",
                         device)
    return Placement("pinned", f"{mib} ({DEVICE_SHARE:.0%} of free {device} memory): too "
                     "large to keep on the device", device)


def tensor_bytes(value: Any) -> int:
    """Bytes of the tensors in a (nested) tuple/list/dict."""
    if isinstance(value, torch.Tensor):
        return value.nbytes
    if isinstance(value, dict):
        return sum(tensor_bytes(v) for v in value.values())
    if isinstance(value, (tuple, list)):
        return sum(tensor_bytes(v) for v in value)
    return 0


def place(loader: Any, device: torch.device) -> Placement:
    """Choose the placement of `loader`'s data and, for ``device``, move it there."""
    data_bytes = loader.tensor_bytes() if loader.mode == "memory" else 0
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None
    placement = choose_placement(device, loader.mode, data_bytes, free)
    if placement.mode == "device":
        loader.to_device(device)
    return placement


class LossSum:
    """An epoch's summed per-sample training loss, kept on the device (no sync per step)."""

    def __init__(self, start: float, device: torch.device) -> None:
        self.total = torch.tensor(start, dtype=torch.float64, device=device)

    def add(self, loss: torch.Tensor, rows: int) -> None:
        # One kernel (~9 us on a CPU): total + rows * float64(loss), computed in float64; the
        # product is exact (24-bit mantissa x a batch size), so this rounds like Python's
        # `total += loss.item() * rows`.
        self.total.add_(loss.detach(), alpha=rows)

    def value(self) -> float:
        """The sum so far (one device-to-host sync)."""
        return self.total.item()


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on the run's device, or nothing for fp32."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def compiled(net: torch.nn.Module, enabled: bool, deterministic: bool = True) -> torch.nn.Module:
    """`net` through torch.compile (compiled at its first call), or `net` itself."""
    if not enabled:
        return net
    import torch._inductor.config as inductor_config

    # Deterministic: skip the on-device benchmarking whose choice of kernel changes numerics
    # (CUDA); the trainer's other determinism switches are on already (config.deterministic).
    inductor_config.deterministic = deterministic
    return torch.compile(net)


# (device type, precision, compile) -> (bitwise reproducible on a rerun, why). Measured with
# this trainer's determinism switches; anything not listed is "not verified".
MEASURED: dict[tuple[str, str, bool], tuple[bool, str]] = {
    ("cpu", "fp32", False): (True, "fp32, eager, deterministic algorithms: the trainer's "
                                   "bitwise tests"),
    ("cuda", "fp32", False): (True, "fp32, eager, deterministic algorithms: bitwise re-run on "
                                    "CUDA (bench/gpu/gpu_check.sh on an H200)"),
    # Reruns of the MLP (classifier) and the CNN (bc_pixels) in fresh processes, one thread;
    # compiled: with a cold and a warm Inductor cache (its C++ kernels give other weights than
    # eager, the same ones on every rerun). Kill/resume under compile was not measured.
    ("cpu", "bf16", False): (True, "bf16 autocast, eager, deterministic algorithms on the CPU: "
                                   "bitwise re-runs measured"),
    ("cpu", "fp32", True): (True, "torch.compile (Inductor C++) on the CPU: bitwise re-runs "
                                  "measured (weights differ from an eager run's)"),
    ("cpu", "bf16", True): (True, "bf16 autocast + torch.compile on the CPU: bitwise re-runs "
                                  "measured (weights differ from an eager run's)"),
    # bench/gpu/gpu_check.sh on an H200 (torch 2.11.0+cu130), 2026-12-04: two fresh-process
    # reruns of the MLP (bc, 330 steps) gave the same weights; bc_pixels in fp32 too. Not
    # measured: bf16 + compile together on CUDA, kill/resume under either.
    ("cuda", "bf16", False): (True, "bf16 autocast, eager, deterministic algorithms: bitwise "
                                    "re-run on CUDA (bench/gpu/gpu_check.sh on an H200)"),
    ("cuda", "fp32", True): (True, "torch.compile (Inductor, deterministic mode) on CUDA: "
                                   "bitwise re-run (bench/gpu/gpu_check.sh on an H200; "
                                   "weights differ from an eager run's)"),
}


def bitwise_record(device: torch.device, precision: str, compile_: bool,
                   deterministic: bool = True) -> dict[str, str]:
    """The run's record of its bitwise reproducibility (MLflow tags)."""
    known = MEASURED.get((device.type, precision, compile_))
    if not deterministic:
        known = (False, f"training.deterministic: false on {device.type}: nondeterministic "
                        "kernels and autotuning allowed for speed (a rerun may give different "
                        "weights; `reproduce` may report a mismatch)")
    elif known is None:
        options = ", ".join(o for o, on in (("bf16 autocast", precision == "bf16"),
                                            ("torch.compile", compile_)) if on)
        known = (False, f"{options} on {device.type}: not verified bitwise reproducible (a "
                        "rerun may give different weights; `reproduce` may report a mismatch)")
    return {"arf.bitwise_reproducible": "true" if known[0] else "false",
            "arf.bitwise_reproducible_reason": known[1]}


@contextlib.contextmanager
def no_grad_autocast(device: torch.device, precision: str) -> Iterator[None]:
    """Validation: no gradients, the training's precision."""
    with torch.no_grad(), autocast(device, precision):
        yield
