"""``pyquant`` (same as ``python -m pyquant``): quantize, eval, bench, inspect, env.

    pyquant quantize MODEL --method gptq --bits 4 --group-size 128 --out OUT
    pyquant eval OUT --compare MODEL
    pyquant bench --device cpu --quick
    pyquant inspect OUT
    pyquant env

MODEL is a transformers model directory or a GGUF file. Results (tables) go to
stdout, progress and logs to stderr. Any failure (a missing file, an unknown
method, a model or format pyquant cannot handle) is one line on stderr,
``pyquant <command>: error: ...``, and exit status 1 (2 for a bad command
line); ``PYQUANT_TRACEBACK=1`` shows the traceback instead. Output
directories appear complete or not at all (written under a temporary name,
renamed at the end).
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
from pathlib import Path

EXPORT_FORMATS = ("gptq", "awq", "compressed-tensors", "gguf")
# What a method must produce for a peer's layout: GPTQ/AWQ-style checkpoints store integer zero
# points, so GPTQ's group refit keeps them integer (QuantConfig.gptq_refit="scale").
EXPORT_CONFIG = {"gptq_refit": "scale"}
SUITE = Path(__file__).resolve().parents[1] / "benchmarks" / "suite.py"


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not usage + message
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    from .methods import METHODS

    parser = _Parser(prog="pyquant", description="pyquant command line")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    q = sub.add_parser("quantize", help="quantize a model and save it")
    q.add_argument("model", help="transformers model directory or GGUF file")
    q.add_argument("--method", default="gptq", choices=sorted(METHODS), metavar="METHOD",
                   help=f"one of {', '.join(sorted(METHODS))} (default gptq)")
    q.add_argument("--bits", type=int, default=4, help="bits per weight of the int formats (default 4)")
    q.add_argument("--group-size", type=int, default=128, help="weights per scale, -1 per row (default 128)")
    q.add_argument("--calib", metavar="FILE", help="calibration text (default: Python's own pydoc text)")
    q.add_argument("--samples", type=int, default=32, help="calibration sequences (default 32)")
    q.add_argument("--seq-len", type=int, default=512, help="tokens per calibration sequence (default 512)")
    q.add_argument("--format", default="pyquant", choices=("pyquant",) + EXPORT_FORMATS,
                   help="output layout (default pyquant)")
    q.add_argument("--out", required=True, help="output directory")
    q.add_argument("--force", action="store_true", help="replace OUT if it exists")
    q.add_argument("--device", help="where blocks are quantized (default: the model's device)")
    q.add_argument("--verbose", action="store_true", help="a line per layer")

    e = sub.add_parser("eval", help="perplexity of a model, side by side with a baseline")
    e.add_argument("model", help="model directory (pyquant checkpoints included) or GGUF file")
    e.add_argument("--text", metavar="FILE", help="evaluation text (default: the end of Python's pydoc text)")
    e.add_argument("--compare", metavar="BASELINE", help="a second model evaluated on the same tokens")
    e.add_argument("--segments", type=int, default=8, help="sequences (default 8)")
    e.add_argument("--seq-len", type=int, default=512, help="tokens per sequence (default 512)")

    b = sub.add_parser("bench", help="the benchmark suite (qmatmul, dequantize vs dense)")
    b.add_argument("--device", choices=("cpu", "cuda"))
    b.add_argument("--quick", action="store_true", help="fewer shapes and M values")
    b.add_argument("--out", metavar="DIR", help="folder for the JSON and the plot")

    i = sub.add_parser("inspect", help="formats, shapes and bits per weight of a checkpoint or GGUF file")
    i.add_argument("path", metavar="FILE_OR_DIR")
    i.add_argument("--json", action="store_true", help="print JSON")

    v = sub.add_parser("env", help="report the live backends")
    v.add_argument("--json", action="store_true", help="print JSON")
    return parser


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, or a bad command line (already reported in one line)
        return exc.code if isinstance(exc.code, int) else 2
    handler = {"quantize": cmd_quantize, "eval": cmd_eval, "bench": cmd_bench, "inspect": cmd_inspect,
               "env": cmd_env}[args.command]
    try:
        return handler(args) or 0
    except KeyboardInterrupt:
        print(f"pyquant {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader stopped (`| head`): exit as a shell tool killed by SIGPIPE would
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        return 141
    except Exception as exc:  # noqa: BLE001  (every failure: one line, unless asked for the traceback)
        if os.environ.get("PYQUANT_TRACEBACK"):
            raise
        print(f"pyquant {args.command}: error: {one_line(exc)}", file=sys.stderr)
        return 1


def one_line(exc: BaseException) -> str:
    from .errors import PyquantError

    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if isinstance(exc, (PyquantError, OSError)) else f"{type(exc).__name__}: {text}"


# --- quantize -------------------------------------------------------------------------
def cmd_quantize(args) -> int:
    from .config import QuantConfig
    from .io.checkpoint import save_quantized

    options = EXPORT_CONFIG if args.format != "pyquant" and args.method == "gptq" else {}
    config = QuantConfig(method=args.method, bits=args.bits, group_size=args.group_size, **options)
    check_export_target(args.out, args.format, args.force)  # refuse before an hour of work, not after
    if args.calib and not os.path.isfile(args.calib):
        raise FileNotFoundError(f"{args.calib}: no such calibration file")
    t0 = time.perf_counter()
    model, tokenizer = load_model(args.model)
    # HQQ's block check reads calibration text when the model brings a tokenizer; GPTQ/AWQ need it
    wants_text = config.needs_calibration or (config.reads_calibration and tokenizer is not None)
    ids = calibration_ids(tokenizer, args) if wants_text else None
    float_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    from .pipeline import quantize_model

    report = quantize_model(model, config, ids, device=args.device, verbose=args.verbose)
    if args.format == "pyquant":
        save_quantized(model, args.out, tokenizer=tokenizer, method=args.method, overwrite=args.force)
    else:
        from .io.exchange import export_model

        export_model(model, args.out, args.format, tokenizer=tokenizer, overwrite=args.force)  # atomic itself
    minutes = (time.perf_counter() - t0) / 60
    from .pipeline.report import format_bytes, markdown_table

    rows = [
        ("model", args.model),
        ("method", config.describe()),
        ("output", f"{args.out} ({args.format})"),
        ("quantized layers", str(len(report.layers))),
        ("linear weights", f"{format_bytes(report.float_bytes)} -> {format_bytes(report.packed_bytes)} "
                           f"({report.bits_per_weight:.3f} bits/weight)"),
        ("model bytes", f"{format_bytes(float_bytes)} in memory -> {format_bytes(dir_bytes(args.out))} on disk"),
        ("minutes", f"{minutes:.2f} (quantization {report.seconds / 60:.2f})"),
    ]
    print(markdown_table(("pyquant quantize", ""), rows))
    return 0


def check_export_target(out: str, fmt: str, force: bool) -> None:
    """FileExistsError unless ``out`` may be written (GGUF to a ``.gguf`` path writes one file)."""
    from .io.files import check_target

    check_target(out, force, is_dir=not (fmt == "gguf" and out.endswith(".gguf")))


def load_model(path):
    """(model, tokenizer or None) of a directory or GGUF file, quietly (our own bar is the progress)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file or directory")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    from .integrations.transformers import load_causal_lm

    return load_causal_lm(path)


def _text_segments(tokenizer, text: str, n: int, seq_len: int, from_end: bool, what: str):
    from .errors import ShapeError
    from .evaluation import token_segments

    total = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    n = min(n, total // seq_len)
    if n < 1:
        raise ShapeError(f"{what} has {total} tokens, fewer than --seq-len {seq_len}")
    return token_segments(tokenizer, text, n, seq_len, from_end=from_end)


def _read_text(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


def calibration_ids(tokenizer, args):
    """Token segments from the front of --calib or of the pydoc text (evaluation reads its end)."""
    from .errors import FormatError
    from .evaluation import pydoc_text

    if tokenizer is None:
        raise FormatError(f"{args.model} has no tokenizer; method {args.method} needs calibration text")
    text = _read_text(args.calib) if args.calib else pydoc_text()
    return _text_segments(tokenizer, text, args.samples, args.seq_len, False, args.calib or "the pydoc text")


def dir_bytes(path: str) -> int:
    """Bytes of a checkpoint directory, or of a single file (a GGUF export)."""
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


# --- eval -----------------------------------------------------------------------------
def cmd_eval(args) -> int:
    from .errors import FormatError
    from .evaluation import perplexity, pydoc_text
    from .pipeline.report import markdown_table

    for path in filter(None, (args.model, args.compare, args.text)):
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path}: no such file or directory")
    models = [(args.model, *load_model(args.model))]
    if args.compare:
        models.append((args.compare, *load_model(args.compare)))
    tokenizer = next((tok for _, _, tok in models if tok is not None), None)
    if tokenizer is None:
        raise FormatError(f"{args.model} has no tokenizer to turn the text into tokens")
    text = _read_text(args.text) if args.text else pydoc_text()
    segments = _text_segments(tokenizer, text, args.segments, args.seq_len, not args.text,
                              args.text or "the pydoc text")
    results = [(path, model, perplexity(model, segments)) for path, model, _ in models]
    base = results[-1][2]  # the baseline when there is one
    extra = ("vs baseline",) if args.compare else ()
    rows = [(path, weight_bits(model), f"{ppl:.3f}") + ((f"{ppl / base:.3f}x",) if extra else ())
            for path, model, ppl in results]
    print(markdown_table(("model", "bits/weight (linear)", f"perplexity ({segments.numel()} tokens)") + extra, rows))
    return 0


def weight_bits(model) -> str:
    from torch import nn

    from .nn import QuantLinear

    bits = n = 0
    for m in model.modules():
        if isinstance(m, QuantLinear):
            bits += m.quantized_weight.nbytes * 8
            n += m.in_features * m.out_features
        elif isinstance(m, nn.Linear):
            bits += m.weight.numel() * m.weight.element_size() * 8
            n += m.weight.numel()
    return f"{bits / n:.3f}" if n else "-"


# --- bench, inspect, env ---------------------------------------------------------------
def cmd_bench(args) -> int:
    argv = (["--device", args.device] if args.device else []) + (["--quick"] if args.quick else [])
    argv += ["--out", args.out] if args.out else []
    return run_benchmark_suite(argv)


def run_benchmark_suite(argv) -> int:
    """Run ``benchmarks/suite.py``'s ``main(argv)`` (a source checkout's; it is not installed)."""
    if not SUITE.is_file():
        raise FileNotFoundError(f"{SUITE}: pyquant bench runs the benchmark suite of a source checkout")
    spec = importlib.util.spec_from_file_location("pyquant_benchmark_suite", SUITE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return int(module.main(argv) or 0)


def cmd_inspect(args) -> int:
    from .io.inspect import describe
    from .pipeline.report import markdown_table

    inv = describe(args.path)
    if args.json:
        print(json.dumps({"path": inv.path, "kind": inv.kind, "tensors": [
            dict(name=n, format=f, shape=s, bits_per_weight=b) for n, f, s, b in inv.rows]}, indent=2))
        return 0
    print(f"{inv.path}: {inv.kind}")
    print(markdown_table(("name", "format", "shape", "bits/weight"),
                         [(n, f, s, f"{b:.3f}") for n, f, s, b in inv.rows]))
    if inv.n_weights:
        print(f"total: {inv.n_weights} weights, {inv.total_bits / 8 / 2**20:.1f} MiB, "
              f"{inv.total_bits / inv.n_weights:.3f} bits/weight")
    return 0


def cmd_env(args) -> int:
    from .env import env, format_env

    info = env()
    print(json.dumps(info, indent=2) if args.json else format_env(info))
    return 0
