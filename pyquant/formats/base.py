"""The format protocol and the container of packed weights.

A :class:`Format` is a small immutable description (bits, group size, block
type...) that knows how its bits are laid out: which tensors a weight of logical
shape ``(out_features, in_features)`` is stored in, their shapes and dtypes, and
how to turn codes + scales into those tensors and back. It never decides *which*
codes to use: that is the job of ``pyquant.algorithms``.

A :class:`QuantizedWeight` is a format plus its packed tensors plus the logical
shape. It is what ``quantize_weight`` returns and what ``qmatmul`` consumes.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable, ClassVar, Dict, Mapping, Optional, Tuple

import torch

from ..errors import DeviceError, DtypeError, FormatError, KernelUnavailableError, ShapeError

TensorSpec = Tuple[Tuple[int, ...], torch.dtype]

_FORMAT_FAMILIES: Dict[str, type] = {}

# The container does not depend on the ops built on it: ``pyquant.ops`` installs
# its dispatching dequantize here when it is imported (``install_dequantizer``).
# Until then (formats imported on their own) a weight decodes with its format's
# pure-torch spec.
_DEQUANTIZER: Optional[Callable[["QuantizedWeight", torch.dtype, str], torch.Tensor]] = None


def install_dequantizer(fn: Callable[["QuantizedWeight", torch.dtype, str], torch.Tensor]) -> None:
    """Route ``QuantizedWeight.dequantize`` through ``fn(qw, dtype, kernel)`` (the op layer's kernels)."""
    global _DEQUANTIZER
    _DEQUANTIZER = fn


def register_format(cls):
    """Class decorator: make a format parseable from its spec string."""
    _FORMAT_FAMILIES[cls.family] = cls
    return cls


def format_from_spec(spec: str) -> "Format":
    """Inverse of ``Format.spec()``: ``"int4_g128_asym_fp16"`` -> ``Int(...)``."""
    if not isinstance(spec, str):
        raise FormatError(f"format spec must be a string, got {type(spec).__name__}")
    family = spec.split("_", 1)[0]
    for cls in _FORMAT_FAMILIES.values():
        if cls.matches_spec(spec):
            return cls.from_spec(spec)
    raise FormatError(
        f"unknown format spec {spec!r} (family {family!r}; known: {sorted(_FORMAT_FAMILIES)})"
    )


class Format:
    """Base class of every storage format (see module docstring)."""

    family: ClassVar[str] = ""

    # --- identity -----------------------------------------------------------
    def spec(self) -> str:
        """A short string that ``format_from_spec`` turns back into this format."""
        raise NotImplementedError

    @classmethod
    def matches_spec(cls, spec: str) -> bool:
        return spec.split("_", 1)[0] == cls.family

    @classmethod
    def from_spec(cls, spec: str) -> "Format":
        raise NotImplementedError

    # --- layout -------------------------------------------------------------
    def tensor_specs(self, shape: Tuple[int, int]) -> Dict[str, TensorSpec]:
        """Name -> (shape, dtype) of every stored tensor, in a fixed order."""
        raise NotImplementedError

    def check_shape(self, shape: Tuple[int, int]) -> None:
        """Raise ShapeError if a weight of this logical shape cannot be stored."""
        n, k = shape
        if n < 1 or k < 1:
            raise ShapeError(f"weight shape must be (out_features>=1, in_features>=1), got {tuple(shape)}")

    # --- the spec of dequantization ------------------------------------------
    def decode(self, tensors: Mapping[str, torch.Tensor], shape: Tuple[int, int]) -> torch.Tensor:
        """The fp32 weight ``(N, K)`` that valid packed ``tensors`` encode, in
        pure torch on their device: the spec every dequantize kernel is tested
        against, bit for bit."""
        raise NotImplementedError

    def dequantize(self, tensors: Mapping[str, torch.Tensor], shape: Tuple[int, int]) -> torch.Tensor:
        """:meth:`decode` after checking ``tensors`` against this format (names,
        shapes, dtypes, one device): the entry point for untrusted tensors."""
        shape = (int(shape[0]), int(shape[1]))
        validate_packed(self, tensors, shape)
        return self.decode(tensors, shape)

    def pack_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Integer codes ``(N, K)`` -> the ``qweight`` tensor (code formats only)."""
        raise FormatError(f"pack/unpack are defined for the code formats (Int, NF4), not {self.spec()}")

    def unpack_codes(self, packed: torch.Tensor, shape: Tuple[int, int]) -> torch.Tensor:
        """Inverse of :meth:`pack_codes`: uint8 codes ``(N, K)``."""
        raise FormatError(f"pack/unpack are defined for the code formats (Int, NF4), not {self.spec()}")

    def bits_per_weight(self, shape: Tuple[int, int]) -> float:
        specs = self.tensor_specs(shape)
        total_bits = 0
        for tshape, dtype in specs.values():
            numel = 1
            for d in tshape:
                numel *= d
            total_bits += numel * torch.empty((), dtype=dtype).element_size() * 8
        return total_bits / (shape[0] * shape[1])

    def describe(self) -> str:
        """Short human-readable summary for ``repr`` of modules."""
        return self.spec()

    def __str__(self) -> str:
        return self.spec()


@dataclasses.dataclass
class QuantizedWeight:
    """Packed tensors of one weight matrix, its format and logical shape.

    ``shape`` is ``(out_features, in_features)`` like ``nn.Linear.weight``.
    """

    format: Format
    tensors: Dict[str, torch.Tensor]
    shape: Tuple[int, int]

    def __post_init__(self):
        if len(self.shape) != 2:
            raise ShapeError(f"weight shape must be (out_features, in_features), got {tuple(self.shape)}")
        self.shape = (int(self.shape[0]), int(self.shape[1]))
        validate_packed(self.format, self.tensors, self.shape)
        # Kernels index packed rows with fixed strides.
        self.tensors = {k: v.contiguous() for k, v in self.tensors.items()}

    # --- views --------------------------------------------------------------
    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def in_features(self) -> int:
        return self.shape[1]

    @property
    def device(self) -> torch.device:
        return next(iter(self.tensors.values())).device

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    @property
    def bits_per_weight(self) -> float:
        return self.nbytes * 8 / (self.shape[0] * self.shape[1])

    def tensor_list(self):
        """The packed tensors in the format's canonical order (what the ops take)."""
        return [self.tensors[name] for name in self.format.tensor_specs(self.shape)]

    # --- conversions --------------------------------------------------------
    def dequantize(self, dtype: torch.dtype = torch.float32, kernel: str = "auto") -> torch.Tensor:
        if _DEQUANTIZER is not None:
            return _DEQUANTIZER(self, dtype, kernel)
        if kernel not in ("auto", "reference"):
            raise KernelUnavailableError(f"kernel={kernel!r} needs pyquant.ops; only the format's own decode is loaded")
        return self.format.decode(self.tensors, self.shape).to(dtype)

    def to(self, device) -> "QuantizedWeight":
        return QuantizedWeight(
            self.format, {k: v.to(device) for k, v in self.tensors.items()}, self.shape
        )

    def cpu(self) -> "QuantizedWeight":
        return self.to("cpu")

    def state_dict(self, prefix: str = "") -> Dict[str, torch.Tensor]:
        """Plain tensors only (safetensors-ready): the packed data, the format spec
        as UTF-8 bytes and the logical shape."""
        out = {prefix + name: t for name, t in self.tensors.items()}
        out[prefix + "format"] = torch.tensor(list(self.format.spec().encode()), dtype=torch.uint8)
        out[prefix + "shape"] = torch.tensor(self.shape, dtype=torch.int64)
        return out

    @classmethod
    def from_state_dict(cls, state: Mapping[str, torch.Tensor], prefix: str = "") -> "QuantizedWeight":
        for key in ("format", "shape"):
            if prefix + key not in state:
                raise FormatError(f"state dict has no {prefix + key!r} entry")
        spec_t = state[prefix + "format"]
        if spec_t.dtype != torch.uint8 or spec_t.dim() != 1:
            raise FormatError(f"{prefix}format must be a 1-D uint8 tensor, got {spec_t.dtype} {tuple(spec_t.shape)}")
        try:
            spec = bytes(spec_t.tolist()).decode()
        except UnicodeDecodeError as exc:
            raise FormatError(f"{prefix}format is not UTF-8: {exc}") from None
        fmt = format_from_spec(spec)
        shape_t = state[prefix + "shape"]
        if shape_t.numel() != 2:
            raise FormatError(f"{prefix}shape must hold 2 values, got {shape_t.numel()}")
        shape = tuple(int(v) for v in shape_t.tolist())
        tensors = {}
        for name in fmt.tensor_specs(shape):
            if prefix + name not in state:
                raise FormatError(f"state dict has no {prefix + name!r} entry for format {spec}")
            tensors[name] = state[prefix + name]
        return cls(fmt, tensors, shape)

    def __repr__(self) -> str:
        return (
            f"QuantizedWeight({self.format.spec()}, shape={self.shape}, "
            f"{self.bits_per_weight:.3f} bits/weight, device={self.device})"
        )


def validate_packed(fmt: Format, tensors: Mapping[str, torch.Tensor], shape: Tuple[int, int]) -> None:
    """Check that packed tensors match what ``fmt`` expects for ``shape``."""
    if not isinstance(fmt, Format):
        raise FormatError(f"expected a pyquant Format, got {type(fmt).__name__}")
    fmt.check_shape(shape)
    specs = fmt.tensor_specs(shape)
    missing = [n for n in specs if n not in tensors]
    extra = [n for n in tensors if n not in specs]
    if missing or extra:
        raise FormatError(
            f"format {fmt.spec()} stores tensors {list(specs)}; missing {missing}, unexpected {extra}"
        )
    device = None
    for name, (tshape, dtype) in specs.items():
        t = tensors[name]
        if not isinstance(t, torch.Tensor):
            raise FormatError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype != dtype:
            raise DtypeError(f"{fmt.spec()} tensor {name!r} must be {dtype}, got {t.dtype}")
        if tuple(t.shape) != tuple(tshape):
            raise ShapeError(
                f"{fmt.spec()} tensor {name!r} for weight shape {tuple(shape)} must be "
                f"{tuple(tshape)}, got {tuple(t.shape)}"
            )
        if device is None:
            device = t.device
        elif t.device != device:
            raise DeviceError(f"packed tensors on different devices: {name!r} on {t.device}, others on {device}")


@functools.lru_cache(maxsize=1024)
def _expected_packed(fmt: Format, shape: Tuple[int, int]):
    return tuple((name, tuple(tshape), dtype) for name, (tshape, dtype) in fmt.tensor_specs(shape).items())


def named_packed(fmt: Format, qdata, shape: Tuple[int, int], device: torch.device) -> Dict[str, torch.Tensor]:
    """Name -> contiguous packed tensor for kernels that read raw pointers.

    The ops accept any ``Tensor[]`` (not only a QuantizedWeight's), so compiled
    kernels re-check count, shapes, dtypes and device before touching memory.
    This runs on every matmul, so the common case is one comparison per tensor
    against cached specs (~1 us); only a mismatch pays for the full check that
    names the offending tensor.
    """
    shape = (int(shape[0]), int(shape[1]))
    specs = _expected_packed(fmt, shape)
    if len(qdata) != len(specs):
        raise ShapeError(f"{fmt.spec()} takes {len(specs)} packed tensors {[n for n, _, _ in specs]}, got {len(qdata)}")
    for q, (name, tshape, dtype) in zip(qdata, specs):
        if not isinstance(q, torch.Tensor) or q.dtype != dtype or tuple(q.shape) != tshape or q.device != device:
            t = dict(zip((n for n, _, _ in specs), qdata))
            validate_packed(fmt, t, shape)
            raise DeviceError(f"packed tensor {name!r} is on {q.device}, the kernel runs on {device}")
    return {name: q.contiguous() for q, (name, _, _) in zip(qdata, specs)}
