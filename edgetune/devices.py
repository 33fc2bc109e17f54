"""Where a model runs and in what precision (model.device, model.dtype), and its peak memory read
the way that device's users read it. Every stage that runs a model goes through here: the
federated setup (federated/setup.py) for finetune, `load_model` for evaluate and zeroshot.

Precision: backprop methods keep float32 master weights and run forward/backward under
torch.autocast in model.dtype, with a GradScaler for float16 (`mixed_precision`), the standard
recipe; zeroth-order methods load the weights in model.dtype and run end to end in it, as MeZO
does (no optimizer state, no gradients: nothing needs a float32 copy). float32 on a CPU changes
nothing: no autocast, no scaler, the same ops as before this module existed.

Memory: on a CPU the process's resident high-water mark (VmHWM, reset per stage and per
evaluated model); on CUDA torch.cuda.max_memory_allocated (what the model's tensors peak at) and
max_memory_reserved (what the caching allocator held: what nvidia-smi and an OOM see).

The CUDA and MPS paths are written but have not run on a GPU in this project's CI (no GPU
there): benchmarks/gpu_check.sh is the check to run on one.
"""

from __future__ import annotations

import resource
from contextlib import contextmanager, nullcontext
from pathlib import Path

MB = 1 << 20  # imports nothing of edgetune at module level: benchmarks/gpu_check.py runs
#              the memory helpers where pydantic is not installed


def resolve(name: str = "cpu"):
    """The torch.device model.device names; auto = CUDA if available, else MPS, else CPU.
    BadInput (exit 2) when the device is asked for and this machine or torch build lacks it."""
    import torch

    from edgetune.config import DEVICE_RE, BadInput

    if not DEVICE_RE.match(name):
        raise BadInput(f"model.device: {name!r} is not a device; expected auto, cpu, cuda, cuda:N or mps")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if mps_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            build = "a CPU-only torch build" if torch.version.cuda is None else f"CUDA {torch.version.cuda}"
            raise BadInput(f"model.device: {name} requested but no CUDA device is available "
                           f"(torch {torch.__version__}, {build}); use auto or cpu")
        index = int(name.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise BadInput(f"model.device: {name} requested but this machine has "
                           f"{torch.cuda.device_count()} CUDA device(s) (cuda:0..); use cuda or auto")
    if name == "mps" and not mps_available():
        raise BadInput("model.device: mps requested but torch.backends.mps is not available; use auto or cpu")
    return torch.device(name)


def check(name: str) -> None:
    """resolve's BadInput, without importing torch where nothing can be missing (auto falls back
    to the CPU; cpu is always there): for processes that only hand the model to a child."""
    if name not in ("auto", "cpu"):
        resolve(name)


def mps_available() -> bool:
    import torch

    return bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()


def torch_dtype(name: str):
    import torch

    return getattr(torch, name)


def describe(device) -> str:
    """A device as logged beside its memory: 'cpu', or 'cuda:0 (NVIDIA H200)'."""
    import torch

    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


def load_model(path, runtime=None):
    """(model, tokenizer) from a pipeline folder on model.device in model.dtype (runtime:
    config.ModelParams; None = CPU, dtype as saved: what every stage did before)."""
    from edgetune.models import load_hf

    if runtime is None:
        return load_hf(path)
    kwargs = {} if runtime.dtype == "float32" else {"dtype": torch_dtype(runtime.dtype)}
    device = resolve(runtime.device)
    model, tok = load_hf(path, **kwargs)
    return (model if device.type == "cpu" else model.to(device)), tok


# --------------------------------------------------------------------------- mixed precision
class MixedPrecision:
    """Autocast (bf16 / fp16) around a backprop step, and a GradScaler for fp16; a no-op in
    float32. `step(loss, optimizer)` does backward, unscale, optimizer step, scaler update."""

    def __init__(self, device, dtype_name: str):
        import torch

        self.device, self.dtype = device, torch_dtype(dtype_name)
        self.enabled = dtype_name != "float32"
        self.scaler = torch.amp.GradScaler(device.type, enabled=dtype_name == "float16")

    def autocast(self):
        import torch

        return torch.autocast(self.device.type, dtype=self.dtype) if self.enabled else nullcontext()

    def step(self, loss, optimizer) -> None:
        self.scaler.scale(loss).backward()
        self.scaler.step(optimizer)
        self.scaler.update()


# --------------------------------------------------------------------------- memory
def reset_peak_rss() -> None:
    """Restart this process's resident-memory high-water mark (Linux). A spawned child starts
    with its parent's mark (Linux keeps it across fork and exec), which ru_maxrss would report."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss_mb() -> float:
    """Peak resident memory since reset_peak_rss (VmHWM), else since the process began."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak(device) -> None:
    """Start a peak-memory measurement on `device` (and of this process's RSS)."""
    reset_peak_rss()
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device) -> dict[str, float | str]:
    """Peak memory since reset_peak: the process's VmHWM (peak_rss_mb); on CUDA also
    max_memory_allocated and max_memory_reserved and the device's name."""
    out: dict[str, float | str] = {"peak_rss_mb": peak_rss_mb()}
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)
        out.update({"peak_gpu_mb": torch.cuda.max_memory_allocated(device) / MB,
                    "peak_gpu_reserved_mb": torch.cuda.max_memory_reserved(device) / MB,
                    "memory_device": describe(device)})
    return out


@contextmanager
def metered(device, into: dict, key: str = "client_peak_gpu_mb"):
    """On CUDA, the largest peak of max_memory_allocated over the bodies run under it, kept in
    into[key] (and into[key with 'reserved']); elsewhere nothing (VmHWM covers the process)."""
    if device.type != "cuda":
        yield
        return
    import torch

    torch.cuda.reset_peak_memory_stats(device)
    yield
    reserved = key.replace("gpu", "gpu_reserved")
    into[key] = max(into.get(key, 0.0), torch.cuda.max_memory_allocated(device) / MB)
    into[reserved] = max(into.get(reserved, 0.0), torch.cuda.max_memory_reserved(device) / MB)
