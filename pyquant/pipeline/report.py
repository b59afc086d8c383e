"""What ``quantize_model`` returns and prints: one record per layer, and the log."""
from __future__ import annotations

import dataclasses
import sys
import time
from typing import Any, Dict, List, Optional

from ..config import QuantConfig


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


class Log:
    """Per-layer lines to stderr (through tqdm when a bar is showing), and the report they go into."""

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

    def write(self, msg: str) -> None:
        if not self.verbose:
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
        self.write("warning: " + msg)

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
