"""What ``quantize_model`` returns and prints: one record per layer, the log and the closing summary.

By default a run shows one progress bar and, at the end, :meth:`QuantReport.summary`.
Per-layer lines go to stderr with ``verbose=True``; otherwise to the ``pyquant``
logger at INFO level (``logging.basicConfig(level=logging.INFO)`` shows them).
"""
from __future__ import annotations

import dataclasses
import logging
import sys
import time
from typing import Any, Dict, List, Optional

from ..config import QuantConfig

logger = logging.getLogger("pyquant")


@dataclasses.dataclass
class LayerRecord:
    name: str
    method: str
    loss: Optional[float]  # the method's own objective (GPTQ: sum err^2/2; AWQ: output error)
    error: float  # relative error: output error tr(dW H dW^T)/tr(W H W^T) with calibration, else ||dW||^2/||W||^2
    seconds: float
    note: str = ""

    def line(self) -> str:
        loss = "-" if self.loss is None else f"{self.loss:.4g}"
        note = f"  {self.note}" if self.note else ""
        return f"{self.name:<40s} {self.method:<5s} loss={loss:<10s} rel_err={self.error:.3e} {self.seconds:6.2f}s{note}"


@dataclasses.dataclass
class QuantReport:
    config: QuantConfig
    layers: List[LayerRecord] = dataclasses.field(default_factory=list)
    seconds: float = 0.0
    n_tokens: int = 0
    warnings: List[str] = dataclasses.field(default_factory=list)
    float_bytes: int = 0  # the quantized layers' weights before, in their float dtype
    packed_bytes: int = 0  # the same weights packed
    n_weights: int = 0

    def __iter__(self):
        return iter(self.layers)

    def __len__(self):
        return len(self.layers)

    def __getitem__(self, i):
        return self.layers[i]

    def to_dicts(self) -> List[Dict[str, Any]]:
        return [dataclasses.asdict(r) for r in self.layers]

    def __str__(self) -> str:
        head = f"{self.config.describe()}: {len(self.layers)} layers in {self.seconds:.1f} s, {self.n_tokens} calibration tokens"
        return "\n".join([head] + [r.line() for r in self.layers] + [f"warning: {w}" for w in self.warnings])

    @property
    def bits_per_weight(self) -> float:
        return self.packed_bytes * 8 / self.n_weights if self.n_weights else 0.0

    def summary(self) -> str:
        """The closing table: what was done, how long, how big, how close, what to look at."""
        rows = [("method", self.config.describe()), ("layers", str(len(self.layers)))]
        by_method: Dict[str, int] = {}
        for r in self.layers:
            by_method[r.method] = by_method.get(r.method, 0) + 1
        if len(by_method) > 1:
            rows.append(("layers by method", ", ".join(f"{m} {n}" for m, n in by_method.items())))
        if self.n_tokens:
            rows.append(("calibration tokens", str(self.n_tokens)))
        rows.append(("time", f"{self.seconds:.1f} s ({self.seconds / 60:.2f} min)"))
        if self.n_weights:
            rows.append(("weights", f"{format_bytes(self.float_bytes)} -> {format_bytes(self.packed_bytes)} "
                                    f"({self.bits_per_weight:.3f} bits/weight)"))
        if self.layers:
            worst = max(self.layers, key=lambda r: r.error)
            mean = sum(r.error for r in self.layers) / len(self.layers)
            rows.append(("relative error", f"mean {mean:.3e}, worst {worst.error:.3e} ({worst.name})"))
        notes = sum(1 for r in self.layers if r.note)
        if notes:
            rows.append(("notes", f"{notes} layer(s) carry a note (verbose=True prints them)"))
        rows += [("warning", w) for w in self.warnings]
        return markdown_table(("quantize_model", ""), rows)


def record_sizes(report: QuantReport, float_bytes: int, n_weights: int, packed_modules) -> None:
    """Fill the report's weight sizes: before (given) and after (the packed modules' tensors)."""
    report.float_bytes, report.n_weights = float_bytes, n_weights
    report.packed_bytes = sum(m.quantized_weight.nbytes for m in packed_modules)


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


def markdown_table(header, rows) -> str:
    """A markdown table whose columns line up in a terminal too."""
    cells = [list(map(str, header))] + [list(map(str, r)) for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]

    def line(row):
        return "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |"

    return "\n".join([line(cells[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in cells[1:]])


class Log:
    """Per-layer lines (to stderr through tqdm when ``verbose``, else to the ``pyquant`` logger),
    the progress bar, and the report they go into."""

    def __init__(self, report: QuantReport, verbose: bool, progress: bool, total: int, desc: str):
        self.report = report
        self.verbose = verbose
        self.bar = None
        if progress and total > 0:
            try:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=total, desc=desc, file=sys.stderr, leave=False)
            except ImportError:
                self.bar = None
        self.plain_progress = progress and self.bar is None
        self.total, self.done, self.t0, self.desc = total, 0, time.perf_counter(), desc

    def write(self, msg: str, level: int = logging.INFO) -> None:
        if not self.verbose:
            logger.log(level, msg)
            return
        if self.bar is not None:
            self.bar.write(f"[pyquant] {msg}", file=sys.stderr)
        else:
            print(f"[pyquant] {msg}", file=sys.stderr, flush=True)

    def record(self, rec: LayerRecord) -> None:
        self.report.layers.append(rec)
        self.write(rec.line())

    def warn(self, msg: str) -> None:
        self.report.warnings.append(msg)
        self.write("warning: " + msg, logging.WARNING)

    def step(self, what: str) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)
        elif self.plain_progress:
            print(f"[pyquant] {self.desc}: {what} {self.done}/{self.total} "
                  f"({time.perf_counter() - self.t0:.1f} s)", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
