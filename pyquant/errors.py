"""Exceptions raised by pyquant.

Every error a user can trigger through a public function is one of these. They
subclass the builtin ValueError/TypeError so existing ``except ValueError``
code keeps working.
"""


class PyquantError(Exception):
    """Base class of every pyquant error."""


class ShapeError(PyquantError, ValueError):
    """A tensor has the wrong shape, or sizes that do not fit the format."""


class DtypeError(PyquantError, TypeError):
    """A tensor has a dtype the operation does not accept."""


class DeviceError(PyquantError, ValueError):
    """Tensors are on the wrong device, or on different devices."""


class FormatError(PyquantError, ValueError):
    """A format is unsupported or packed data does not match its format.

    Also raised for malformed files (GGUF, checkpoints); the message names the
    file offset or tensor and the reason.
    """


class ValueRangeError(PyquantError, ValueError):
    """A value is out of range: NaN/Inf weights, a scale that overflows its dtype."""


class KernelUnavailableError(PyquantError, RuntimeError):
    """A kernel was forced with ``kernel=`` but cannot run here."""
