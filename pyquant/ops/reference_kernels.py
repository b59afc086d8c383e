"""Registers the pure-torch reference as a backend that supports everything."""
from __future__ import annotations

from . import reference
from .dispatch import register_kernel


def _always(fmt, device, m):
    return True


def _code_format(fmt, device, m):
    return fmt.family in ("int", "nf4")


register_kernel("dequantize", "reference", "reference_dequantize", _always)(reference.dequantize)
register_kernel("qmatmul", "reference", "reference_qmatmul", _always)(reference.qmatmul)
register_kernel("pack", "reference", "reference_pack", _code_format)(reference.pack)
register_kernel("unpack", "reference", "reference_unpack", _code_format)(reference.unpack)
