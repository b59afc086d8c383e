"""``quantize_model`` and its report.

Layout: ``driver.py`` (the entry point and the block loop), ``capture.py``
(model surgery, input capture, grouping of linears by shared input),
``passes/`` (one module per kind of method: ``plain``, ``gptq``, ``awq``),
``arch.py`` (model-family adapters: which layers AWQ folds into what),
``folds.py`` (AWQ's fold targets and the check that a fold keeps the float
function), ``report.py`` (LayerRecord, QuantReport, the log).
"""
from .driver import quantize_model
from .report import LayerRecord, QuantReport

__all__ = ["quantize_model", "QuantReport", "LayerRecord"]
