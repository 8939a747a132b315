"""The one dispatch point: which implementation of an NVFP4 operation runs.

Backends:

* ``"xla"`` -- the ``jnp`` reference (``reference.py``), compiled by XLA; runs everywhere.
* ``"pallas"`` -- Pallas Mosaic GPU kernels (``kernels/``). Compiled on NVIDIA GPUs with
  compute capability >= 9.0 (Hopper and newer); on a machine without a GPU they run in the
  Mosaic GPU interpreter (slow, exact: what CI exercises).

Selection order: the ``backend=`` argument, then the ``NVFP4_JAX_BACKEND`` environment
variable, then the best available for the platform (``"pallas"`` on sm_90+ GPUs, ``"xla"``
otherwise). A backend named explicitly that cannot run raises ``ValueError`` listing the
available ones; it never falls back silently.

Every dispatch is recorded (at trace time) so tests can assert which implementation ran:
``with backends.record() as log: ...`` collects ``Dispatch`` events.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import os
import re
import warnings
from collections.abc import Callable, Iterator

import jax

ENV_VAR = "NVFP4_JAX_BACKEND"


class Backend(str, enum.Enum):
    XLA = "xla"
    PALLAS = "pallas"


@dataclasses.dataclass(frozen=True)
class DeviceInfo:
    """What the kernels need to know about the target device."""

    platform: str  # "gpu", "cpu", "tpu"
    device_kind: str
    compute_capability: tuple[int, int] | None  # None off NVIDIA GPUs
    num_sms: int | None

    @property
    def is_hopper_or_newer(self) -> bool:
        return self.compute_capability is not None and self.compute_capability >= (9, 0)


_KIND_CAPABILITY = (
    ("H100", (9, 0)),
    ("H200", (9, 0)),
    ("H800", (9, 0)),
    ("GH200", (9, 0)),
    ("B200", (10, 0)),
    ("B100", (10, 0)),
    ("GB200", (10, 0)),
)


def device_info() -> DeviceInfo:
    """The target device, honouring an abstract mesh (used to cross-lower for sm_90 on CPU).

    Every device query in the package goes through here.
    """
    abstract = jax.sharding.get_abstract_mesh().abstract_device
    if abstract is not None:
        platform = "gpu" if abstract.platform in ("cuda", "gpu") else abstract.platform
        cc = next((c for k, c in _KIND_CAPABILITY if k in abstract.device_kind), None)
        if platform == "gpu" and cc is None:
            cc = (9, 0)  # Mosaic GPU assumes sm_90 when cross-lowering from a CPU host
        return DeviceInfo(platform, abstract.device_kind, cc, abstract.num_cores)
    d = jax.devices()[0]
    cc = None
    if d.platform == "gpu":
        match = re.match(r"(\d+)\.(\d+)", str(getattr(d, "compute_capability", "")))
        cc = (int(match.group(1)), int(match.group(2))) if match else None
    return DeviceInfo(d.platform, d.device_kind, cc, getattr(d, "core_count", None))


def interpret_pallas() -> bool:
    """True where Pallas GPU kernels must run in the Mosaic GPU interpreter (no GPU)."""
    return device_info().platform != "gpu"


# -- registry ------------------------------------------------------------------------------
_IMPLS: dict[tuple[str, Backend], Callable] = {}


def register(op: str, backend: Backend) -> Callable[[Callable], Callable]:
    def deco(fn: Callable) -> Callable:
        _IMPLS[(op, backend)] = fn
        return fn

    return deco


def unavailable_reason(op: str, backend: Backend, info: DeviceInfo | None = None) -> str | None:
    """Why ``backend`` cannot run ``op`` here, or ``None`` when it can."""
    if (op, backend) not in _IMPLS:
        return f"no {backend.value!r} implementation of {op!r}"
    if backend is Backend.PALLAS:
        info = info or device_info()
        if info.platform == "gpu" and not info.is_hopper_or_newer:
            return (
                f"Pallas Mosaic GPU kernels need compute capability >= 9.0, "
                f"this GPU ({info.device_kind}) has {info.compute_capability}"
            )
        if info.platform not in ("gpu", "cpu"):
            return f"Pallas Mosaic GPU kernels do not run on {info.platform}"
    return None


def available(op: str) -> list[str]:
    info = device_info()
    return [b.value for b in Backend if unavailable_reason(op, b, info) is None]


def _parse(name: str | Backend, source: str, op: str) -> Backend:
    if isinstance(name, Backend):
        return name
    try:
        return Backend(str(name).lower())
    except ValueError:
        raise ValueError(
            f"unknown NVFP4 backend {name!r} (from {source}); available for {op!r}: {available(op)}"
        ) from None


def select(op: str, backend: str | Backend | None = None) -> Backend:
    """Pick the backend for ``op``: argument, then ``$NVFP4_JAX_BACKEND``, then the best."""
    if backend is not None or os.environ.get(ENV_VAR):
        source = "the backend argument" if backend is not None else f"${ENV_VAR}"
        chosen = _parse(backend if backend is not None else os.environ[ENV_VAR], source, op)
        reason = unavailable_reason(op, chosen)
        if reason is not None:
            raise ValueError(
                f"NVFP4 backend {chosen.value!r} (from {source}) cannot run {op!r}: {reason}; "
                f"available: {available(op)}"
            )
        return chosen
    info = device_info()
    if info.platform == "gpu":
        reason = unavailable_reason(op, Backend.PALLAS, info)
        if reason is None:
            return Backend.PALLAS
        if (op, Backend.PALLAS) in _IMPLS and op not in _WARNED:
            _WARNED.add(op)
            warnings.warn(
                f"nvfp4_jax: {op} falls back to the 'xla' backend: {reason}", stacklevel=3
            )
    return Backend.XLA


_WARNED: set[str] = set()


@dataclasses.dataclass(frozen=True)
class Dispatch:
    op: str
    backend: str
    detail: str = ""


_LOGS: list[list[Dispatch]] = []


@contextlib.contextmanager
def record() -> Iterator[list[Dispatch]]:
    """Collect the dispatches made (at trace time) inside the ``with`` block."""
    log: list[Dispatch] = []
    _LOGS.append(log)
    try:
        yield log
    finally:
        _LOGS.remove(log)


def note(op: str, backend: Backend, detail: str = "") -> None:
    for log in _LOGS:
        log.append(Dispatch(op, backend.value, detail))


def implementation(op: str, backend: str | Backend | None = None) -> tuple[Backend, Callable]:
    """Resolve ``op`` to ``(backend, fn)`` and record the dispatch."""
    chosen = select(op, backend)
    note(op, chosen, "interpret" if chosen is Backend.PALLAS and interpret_pallas() else "")
    return chosen, _IMPLS[(op, chosen)]


def call(op: str, backend: str | Backend | None, *args, **kwargs):
    """Run ``op`` on the selected backend.

    An implementation raises ``NotImplementedError`` for valid input it does not support
    (e.g. an output dtype a kernel cannot write). If the backend was chosen automatically the
    call then falls back to ``"xla"`` (recorded with the reason); a backend named by the
    caller or ``$NVFP4_JAX_BACKEND`` re-raises.
    """
    chosen, fn = implementation(op, backend)
    try:
        return fn(*args, **kwargs)
    except NotImplementedError as e:
        if chosen is Backend.XLA or backend is not None or os.environ.get(ENV_VAR):
            raise
        note(op, Backend.XLA, f"fallback: {e}")
        return _IMPLS[(op, Backend.XLA)](*args, **kwargs)
