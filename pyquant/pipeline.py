"""``quantize_model``: quantize every selected linear layer of a model, block by block.

    report = pyquant.quantize_model(model, pyquant.QuantConfig("gptq", bits=4, group_size=64), ids)

Calibrated methods (GPTQ, AWQ) run the model once up to its first decoder
block (the embeddings) to capture that block's inputs and keyword arguments
(attention mask, rotary embeddings), then for each block:

1. find the block's linear layers and group those that read the same input
   tensor, in execution order (Llama: q/k/v, o, gate/up, down) — one forward
   pass with hooks, so any decoder architecture works;
2. GPTQ: for each group in turn, accumulate ``H = 2/n X^T X`` from its input
   with the earlier groups already quantized (true-sequential; the forward
   stops at the group, nothing after it is computed), quantize the group's
   layers, swap in ``QuantLinear``. AWQ: one float pass collects each group's
   Gram matrix and ``mean|x|``; scales are searched and folded group by group
   (see ``pyquant.algorithms.awq``), then ranges are clipped and rounded;
3. run the quantized block on the captured inputs: these outputs are the next
   block's inputs. Peak memory is one block plus the calibration activations
   (n_samples x seq_len x hidden, twice).

Methods without calibration (RTN, HQQ, GGUF types) quantize layer by layer and
accept ``calibration_data=None``.

Linear layers the filter selects outside the decoder blocks get RTN with a
note in the report (calibrating them would need their own capture pass).
"""
from __future__ import annotations

import dataclasses
import sys
import time
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple, Union

import torch
from torch import nn

from .config import QuantConfig
from .errors import DtypeError, FormatError, ShapeError, ValueRangeError
from .formats import QuantizedWeight
from .nn.quant_linear import QuantLinear, default_filter


# --- report --------------------------------------------------------------------
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


class _Log:
    """Per-layer lines to stderr (through tqdm when a bar is showing)."""

    def __init__(self, verbose: bool, progress: bool, total: int, desc: str):
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


# --- helpers -------------------------------------------------------------------
class _StopForward(Exception):
    pass


def _select_targets(model: nn.Module, filter) -> Dict[str, nn.Linear]:
    out = {}
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear) or isinstance(mod, QuantLinear):
            continue
        keep = default_filter(name, mod, model) if filter is None else filter(name, mod)
        if keep:
            out[name] = mod
    if not out:
        raise ValueRangeError(
            "quantize_model: the filter matched no nn.Linear layer in the model "
            f"({sum(isinstance(m, nn.Linear) for m in model.modules())} linear layers in total)"
        )
    return out


def _find_blocks(model: nn.Module) -> Tuple[str, nn.ModuleList]:
    """The decoder layer list: the ModuleList holding the most linear layers."""
    best, best_name, best_count = None, None, 0
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0:
            count = sum(isinstance(m, nn.Linear) for m in mod.modules())
            if count > best_count:
                best, best_name, best_count = mod, name, count
    if best is None:
        raise FormatError(
            "quantize_model: no list of decoder blocks (nn.ModuleList of modules with linear layers) found; "
            "calibrated methods need a block-structured model"
        )
    return best_name, best


def _set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def _calibration_batches(data, batch_size: int, min_tokens: int, vocab_size: Optional[int]) -> List[torch.Tensor]:
    if data is None:
        raise ValueRangeError("this method needs calibration_data: a LongTensor (n_samples, seq_len) of token ids")
    if isinstance(data, torch.Tensor):
        items = [data]
    elif isinstance(data, (str, bytes)) or not isinstance(data, Iterable):
        raise DtypeError(f"calibration_data must be a LongTensor or an iterable of them, got {type(data).__name__}")
    else:
        items = list(data)
    batches = []
    for i, t in enumerate(items):
        where = "calibration_data" if isinstance(data, torch.Tensor) else f"calibration_data[{i}]"
        if not isinstance(t, torch.Tensor):
            raise DtypeError(f"{where} must be a tensor of token ids, got {type(t).__name__}")
        if t.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise DtypeError(f"{where} must hold integer token ids (torch.long), got {t.dtype}")
        if t.dim() == 1:
            t = t.unsqueeze(0)
        if t.dim() != 2:
            raise ShapeError(f"{where} must be (n_samples, seq_len) or (seq_len,), got shape {tuple(t.shape)}")
        if t.numel() == 0:
            continue
        lo, hi = int(t.min()), int(t.max())
        if lo < 0 or (vocab_size is not None and hi >= vocab_size):
            raise ValueRangeError(f"{where} has token ids in [{lo}, {hi}], outside the vocabulary [0, {vocab_size})")
        t = t.to(torch.long)
        for j in range(0, t.shape[0], batch_size):
            batches.append(t[j : j + batch_size])
    n_tokens = sum(b.numel() for b in batches)
    if n_tokens < min_tokens:
        raise ShapeError(
            f"too few calibration tokens: {n_tokens} (need at least {min_tokens}; typical: 128 x 512)"
        )
    return batches


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _move_outside(module: nn.Module, blocks: nn.Module, device) -> None:
    """Move everything but the decoder blocks to ``device`` (embeddings, rotary tables)."""
    for child in module.children():
        if child is blocks:
            continue
        if any(m is blocks for m in child.modules()):
            _move_outside(child, blocks, device)
        else:
            child.to(device)
    for key, p in list(module._parameters.items()):
        if p is not None:
            p.data = p.data.to(device)
    for key, b in list(module._buffers.items()):
        if b is not None:
            module._buffers[key] = b.to(device)


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _run(block, x, kw):
    return _first(block(x, **kw))


def _rel_error(w: torch.Tensor, dq: torch.Tensor, H: Optional[torch.Tensor]) -> float:
    w = w.float()
    d = dq.float() - w
    if H is None:
        den = float((w * w).sum())
        return float((d * d).sum()) / den if den > 0 else 0.0
    den = float(((w @ H) * w).sum())
    return float(((d @ H) * d).sum()) / den if den > 0 else 0.0


# --- per-layer quantizers ------------------------------------------------------
def _quantize_plain(w: torch.Tensor, cfg: QuantConfig) -> Tuple[QuantizedWeight, Optional[float], str]:
    fmt = cfg.format()
    if cfg.method == "hqq":
        try:
            from .algorithms.hqq import hqq_quantize
        except ImportError as exc:
            raise FormatError(f"method 'hqq' is not available in this build ({exc})") from exc
        kwargs = {"zero_point": cfg.hqq_zero_point, **cfg.method_kwargs}
        return hqq_quantize(w.float(), fmt, **kwargs), None, ""
    if cfg.is_gguf:
        from .algorithms.rtn import rtn

        fmt = cfg.format_for(w.shape[1])
        note = "" if fmt == cfg.format() else f"fallback {fmt.type}: in_features {w.shape[1]} % 256 != 0"
        return rtn(w.float(), fmt), None, note
    from .algorithms.rtn import rtn

    return rtn(w.float(), fmt), None, ""


def _check_weight(name: str, w: torch.Tensor) -> None:
    if not bool(torch.isfinite(w).all()):
        raise ValueRangeError(f"layer {name!r}: weight contains NaN or Inf")


# --- the entry point ------------------------------------------------------------
def quantize_model(
    model: nn.Module,
    config: QuantConfig,
    calibration_data=None,
    *,
    filter: Optional[Callable[[str, nn.Module], bool]] = None,
    device: Union[str, torch.device, None] = None,
    offload: bool = False,
    progress: bool = True,
    verbose: bool = True,
    kernel: str = "auto",
) -> QuantReport:
    """Replace, in place, the selected ``nn.Linear`` layers of ``model`` by
    ``QuantLinear`` modules quantized as ``config`` says. Returns a
    :class:`QuantReport` (one :class:`LayerRecord` per layer, also logged to
    stderr when ``verbose``).

    ``calibration_data``: LongTensor (n_samples, seq_len) of token ids, or an
    iterable of such tensors (or 1-D sequences); needed by GPTQ and AWQ,
    ignored by the others. ``filter(name, module) -> bool`` picks the layers
    (default: every linear but the output head). ``device``: where blocks are
    processed (default: the model's device; blocks are moved there one at a
    time and moved back afterwards). ``offload``: move each finished block to
    the CPU. ``kernel`` is forwarded to the QuantLinear modules.
    """
    if not isinstance(config, QuantConfig):
        raise FormatError(f"config must be a pyquant.QuantConfig, got {type(config).__name__}")
    if not isinstance(model, nn.Module):
        raise FormatError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    t_start = time.perf_counter()
    report = QuantReport(config)
    targets = _select_targets(model, filter)
    if config.is_gguf or not config.needs_calibration:
        log = _Log(verbose, progress, len(targets), f"{config.method}")
        try:
            with torch.no_grad():
                for name, mod in targets.items():
                    t0 = time.perf_counter()
                    w = mod.weight.detach()
                    _check_weight(name, w)
                    try:
                        qw, loss, note = _quantize_plain(w, config)
                    except (ValueError, TypeError) as exc:
                        raise type(exc)(f"layer {name!r} (weight {tuple(w.shape)}): {exc}") from exc
                    qw = qw.to(w.device)
                    err = _rel_error(w, qw.dequantize(torch.float32), None)
                    _set_module(model, name, QuantLinear(qw, mod.bias, kernel=kernel))
                    rec = LayerRecord(name, config.method, loss, err, time.perf_counter() - t0, note)
                    report.layers.append(rec)
                    log.write(rec.line())
                    log.step("layer")
        finally:
            log.close()
        report.seconds = time.perf_counter() - t_start
        return report
    with torch.no_grad():
        _calibrated(model, config, calibration_data, targets, report, device, offload, progress, verbose, kernel)
    report.seconds = time.perf_counter() - t_start
    return report


def _capture_first_block(model, blocks, batches, device):
    inps, kws = [], []
    first = blocks[0]

    def hook(module, args, kwargs):
        x = args[0] if args else kwargs.pop("hidden_states")
        kw = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        for key in ("cache", "past_key_values", "past_key_value", "layer_past"):
            if key in kw:
                kw[key] = None
        if "use_cache" in kw:
            kw["use_cache"] = False
        inps.append(x.detach())
        kws.append(kw)
        raise _StopForward

    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for b in batches:
            try:
                try:
                    model(input_ids=b.to(device), use_cache=False)
                except TypeError:
                    model(b.to(device))
            except _StopForward:
                pass
    finally:
        handle.remove()
    if len(inps) != len(batches):
        raise FormatError("quantize_model: the model's forward never reached its first decoder block")
    return inps, kws


def _first_sample(x, kw):
    """Batch row 0 of a captured batch and its kwargs (tensors with the batch
    dimension sliced too): the grouping pass needs one sequence, not eight."""
    b = x.shape[0]
    if b == 1:
        return x, kw

    def cut(v):
        if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == b:
            return v[:1]
        if isinstance(v, tuple):
            return tuple(cut(t) for t in v)
        return v

    return x[:1], {k: cut(v) for k, v in kw.items()}


def _input_groups(block: nn.Module, x, kw) -> Tuple[List[List[str]], Dict[str, Optional[str]], Dict[str, nn.Module]]:
    """Linear layers of ``block`` grouped by identical input tensor, in execution
    order, plus for each group's input the name of the module that produced it
    (None when it is not a module output)."""
    linears = {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear)}
    order: List[Tuple[str, int]] = []
    producers: Dict[int, str] = {}
    handles = []

    # Every tensor seen is kept alive until grouping is done, so no id() is
    # reused by a later allocation during the pass.
    keep = []

    def pre(name):
        def f(m, args):
            if args:
                keep.append(args[0])
                order.append((name, id(args[0])))
        return f

    def post(name):
        def f(m, args, out):
            if isinstance(out, torch.Tensor):
                keep.append(out)
                producers.setdefault(id(out), name)
        return f

    for n, m in block.named_modules():
        if n == "":
            continue
        handles.append(m.register_forward_hook(post(n)))
    for n, m in linears.items():
        handles.append(m.register_forward_pre_hook(pre(n)))
    try:
        out = block(x, **kw)
        keep.append(out)  # keep tensors alive so ids stay unique during grouping
    finally:
        for h in handles:
            h.remove()
    groups: List[List[str]] = []
    key_of: Dict[int, int] = {}
    group_producer: Dict[str, Optional[str]] = {}
    seen = set()
    for name, key in order:
        if name in seen:
            continue  # a layer called twice: grouped at its first call
        seen.add(name)
        if key in key_of:
            groups[key_of[key]].append(name)
        else:
            key_of[key] = len(groups)
            groups.append([name])
            group_producer[name] = producers.get(key)
    prod = {g[0]: group_producer.get(g[0]) for g in groups}
    return groups, prod, linears


def _calibrated(model, cfg, data, targets, report, device, offload, progress, verbose, kernel):
    fmt = cfg.format()
    blocks_name, blocks = _find_blocks(model)
    vocab = None
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is not None and hasattr(emb, "num_embeddings"):
        vocab = emb.num_embeddings
    batches = _calibration_batches(data, cfg.batch_size, cfg.min_tokens, vocab)
    n_tokens = sum(b.numel() for b in batches)
    report.n_tokens = n_tokens
    home = _model_device(model)
    dev = torch.device(device) if device is not None else home
    was_training = model.training
    model.eval()
    if dev != home:
        _move_outside(model, blocks, dev)
    log = _Log(verbose, progress, len(blocks), f"{cfg.method} blocks")
    try:
        inps, kws = _capture_first_block(model, blocks, batches, dev)
        max_k = max(m.in_features for m in targets.values())
        if n_tokens < max_k:
            msg = (f"{n_tokens} calibration tokens < {max_k} input features: the Hessians are rank-deficient; "
                   "damping keeps them invertible but more tokens give better results")
            report.warnings.append(msg)
            log.write("warning: " + msg)
        block_prefix = {id(b): f"{blocks_name}.{i}" for i, b in enumerate(blocks)}
        for bi, block in enumerate(blocks):
            prefix = block_prefix[id(block)]
            block_home = _model_device(block)
            block.to(dev)
            names = {n: f"{prefix}.{n}" for n, m in block.named_modules() if isinstance(m, nn.Linear)}
            selected = [n for n, full in names.items() if full in targets]
            if selected:
                try:
                    groups, producers, linears = _input_groups(block, *_first_sample(inps[0], kws[0]))
                except (RuntimeError, ValueError, IndexError):  # a kwarg that was not batch-major
                    groups, producers, linears = _input_groups(block, inps[0], kws[0])
                if cfg.method == "gptq":
                    _gptq_block(block, prefix, groups, linears, selected, inps, kws, cfg, fmt, report, log, kernel)
                else:
                    _awq_block(block, prefix, groups, producers, linears, selected, inps, kws, cfg, fmt, report, log,
                               kernel)
            for i in range(len(inps)):
                inps[i] = _run(block, inps[i], kws[i])
                if not bool(torch.isfinite(inps[i]).all()):
                    raise ValueRangeError(f"block {prefix} produced NaN/Inf outputs after quantization")
            if offload:
                block.to("cpu")
            elif block_home != dev:
                block.to(block_home)
            log.step("block")
        # Selected layers outside the blocks: round to nearest.
        for name, mod in targets.items():
            if name.startswith(blocks_name + "."):
                continue
            t0 = time.perf_counter()
            from .algorithms.rtn import rtn

            w = mod.weight.detach()
            _check_weight(name, w)
            qw = rtn(w.float(), fmt).to(w.device)
            _set_module(model, name, QuantLinear(qw, mod.bias, kernel=kernel))
            rec = LayerRecord(name, "rtn", None, _rel_error(w, qw.dequantize(torch.float32), None),
                              time.perf_counter() - t0, "outside the decoder blocks: no calibration")
            report.layers.append(rec)
            log.write(rec.line())
    finally:
        log.close()
        if dev != home:
            _move_outside(model, blocks, home)
        model.train(was_training)


def _accumulate(block, layer: nn.Module, inps, kws, acc, stop: bool = True):
    def hook(m, args):
        acc.add(args[0])
        if stop:
            raise _StopForward

    h = layer.register_forward_pre_hook(hook)
    try:
        for x, kw in zip(inps, kws):
            try:
                block(x, **kw)
            except _StopForward:
                pass
    finally:
        h.remove()


def _group_accumulator(linears, prefix, g, **kw):
    """The input statistics of group ``g`` (layers sharing one input), named after its first layer."""
    from .algorithms.hessian import HessianAccumulator

    lin = linears[g[0]]
    return HessianAccumulator(lin.in_features, device=lin.weight.device, name=f"{prefix}.{g[0]}", **kw)


def _accumulate_all(block, pairs, inps, kws):
    """One full pass of ``block`` over the calibration inputs, feeding the input
    of each ``(layer, accumulator)`` pair to its accumulator."""
    handles = [layer.register_forward_pre_hook(lambda m, a, acc=acc: acc.add(a[0])) for layer, acc in pairs]
    try:
        for x, kw in zip(inps, kws):
            block(x, **kw)
    finally:
        for h in handles:
            h.remove()


def _gptq_block(block, prefix, groups, linears, selected, inps, kws, cfg, fmt, report, log, kernel):
    from .algorithms.gptq import gptq_quantize

    todo = [[n for n in g if n in selected] for g in groups]
    todo = [g for g in todo if g]
    pending = []  # (names, accumulator) when not true-sequential
    if not cfg.true_sequential:
        # One pass collects every group's Hessian from the float block.
        accs = [_group_accumulator(linears, prefix, g) for g in todo]
        _accumulate_all(block, [(linears[g[0]], acc) for g, acc in zip(todo, accs)], inps, kws)
        pending = list(zip(todo, accs))
    for gi, g in enumerate(todo):
        if cfg.true_sequential:
            acc = _group_accumulator(linears, prefix, g)
            _accumulate(block, linears[g[0]], inps, kws, acc)
        else:
            acc = pending[gi][1]
        H = acc.hessian()
        for name in g:
            t0 = time.perf_counter()
            mod = linears[name]
            full = f"{prefix}.{name}"
            w = mod.weight.detach()
            _check_weight(full, w)
            try:
                res = gptq_quantize(
                    w, H, fmt, damp=cfg.damp, block_size=cfg.block_size, static_groups=cfg.static_groups,
                    clip=cfg.clip, clip_grid=cfg.clip_grid, clip_max_shrink=cfg.clip_max_shrink,
                    order="hessian" if cfg.act_order == "static" else "natural", refit=cfg.gptq_refit,
                )
            except (ValueError, TypeError) as exc:
                raise type(exc)(f"layer {full!r} (weight {tuple(w.shape)}): {exc}") from exc
            qw = res.qweight.to(w.device)
            notes = []
            if res.damp_retries:
                notes.append(f"Cholesky failed, damp raised to {res.damp:g}")
            if res.dead_columns:
                notes.append(f"{res.dead_columns} dead inputs")
            if cfg.gptq_refit and res.refit_rows < w.shape[0]:
                notes.append(f"refit kept the GPTQ parameters of {w.shape[0] - res.refit_rows} rows")
            err = _rel_error(w, qw.dequantize(torch.float32), H)
            _set_module(block, name, QuantLinear(qw, mod.bias, kernel=kernel))
            rec = LayerRecord(full, "gptq", res.loss, err, time.perf_counter() - t0, "; ".join(notes))
            report.layers.append(rec)
            if res.damp_retries:
                report.warnings.append(f"{full}: {notes[0]}")
            log.write(rec.line())


def _awq_block(block, prefix, groups, producers, linears, selected, inps, kws, cfg, fmt, report, log, kernel):
    from .algorithms import awq as A

    # 1. statistics of every group's input, float block
    accs = [_group_accumulator(linears, prefix, g, abs_mean=True) for g in groups]
    _accumulate_all(block, [(linears[g[0]], acc) for g, acc in zip(groups, accs)], inps, kws)
    grams = {}
    info = {}
    # 2. scales, group by group, folded as we go
    for g, acc in zip(groups, accs):
        sel = [n for n in g if n in selected]
        gram = acc.gram.clone()
        for n in g:
            grams[n] = gram
        if not sel:
            continue
        t0 = time.perf_counter()
        fold, tie, n_cls = _awq_fold_target(block, g, producers.get(g[0]), linears)
        res = A.awq_search_scale([linears[n].weight for n in sel], gram, acc.abs_mean(), fmt,
                                 grid=cfg.awq_grid, duo_scaling=cfg.awq_duo_scaling, tie=tie,
                                 max_rows=cfg.awq_max_rows)
        s = res.scale
        if res.ratio == 0.0:
            note = "scale search kept s=1"
        else:
            note = f"alpha={res.ratio:.2f}{' duo' if res.duo else ''}"
            for n in g:  # every consumer of this input, selected or not
                A.scale_columns(linears[n], s)
            if fold is None:
                note += ", explicit input scale"
            else:
                kind, target = fold
                if kind == "norm":
                    A.fold_into_norm(target, s)
                else:
                    A.fold_into_rows(target, A.untie(s, tie, n_cls))
                note += f", folded into {kind}"
            gram.div_(s.unsqueeze(0) * s.unsqueeze(1))
        for n in sel:
            info[n] = (res, s if (res.ratio != 0.0 and fold is None) else None, note,
                       (time.perf_counter() - t0) / len(sel))
    # 3. clip and round
    for name in selected:
        t0 = time.perf_counter()
        mod = linears[name]
        full = f"{prefix}.{name}"
        w = mod.weight.detach().float()
        _check_weight(full, w)
        res, explicit, note, t_search = info[name]
        gram = grams[name]
        shrink = None
        leaf = name.rsplit(".", 1)[-1]
        if cfg.awq_clip and (cfg.awq_clip_qk or leaf not in ("q_proj", "k_proj")):
            shrink = A.awq_clip_search(w, gram, fmt, grid=cfg.awq_clip_grid, max_shrink=cfg.awq_clip_max_shrink)
            note += ", clipped"
        qw = A.rtn_quantize(w, fmt, shrink).to(mod.weight.device)
        dq = qw.dequantize(torch.float32)
        loss = A.output_error(dq - w, gram)
        err = _rel_error(w, dq, gram)
        new: nn.Module = QuantLinear(qw, mod.bias, kernel=kernel)
        if explicit is not None:
            new = A.ScaledInputLinear(new, explicit)
        _set_module(block, name, new)
        rec = LayerRecord(full, "awq", loss, err, time.perf_counter() - t0 + t_search, note)
        report.layers.append(rec)
        log.write(rec.line())


def _awq_fold_target(block, group, producer, linears):
    """Where AWQ's 1/s goes for a group: (("norm"|"linear", module) | None, tie, n_classes)."""
    first = group[0]
    parent, _, leaf = first.rpartition(".")
    sib = lambda n: f"{parent}.{n}" if parent else n  # noqa: E731
    if leaf == "o_proj" and sib("v_proj") in linears:
        v = linears[sib("v_proj")]
        o = linears[first]
        if v.out_features == o.in_features:
            return ("linear", v), None, o.in_features
        attn = block.get_submodule(parent) if parent else block
        cfgm = getattr(attn, "config", None)
        head_dim = getattr(attn, "head_dim", None)
        n_heads = getattr(cfgm, "num_attention_heads", None)
        n_kv = getattr(cfgm, "num_key_value_heads", None)
        if head_dim and n_heads and n_kv and n_heads * head_dim == o.in_features and n_kv * head_dim == v.out_features:
            from .algorithms.awq import gqa_tie

            tie = gqa_tie(n_heads, n_kv, head_dim, o.weight.device)
            return ("linear", v), tie, v.out_features
        return None, None, o.in_features
    if leaf == "down_proj" and sib("up_proj") in linears:
        up = linears[sib("up_proj")]
        if up.out_features == linears[first].in_features:
            return ("linear", up), None, up.out_features
    if producer is not None:
        mod = block.get_submodule(producer)
        k = linears[first].in_features
        if isinstance(mod, nn.Linear) and mod.out_features == k:
            return ("linear", mod), None, k
        w = getattr(mod, "weight", None)
        if isinstance(w, torch.Tensor) and w.dim() == 1 and w.numel() == k and not isinstance(mod, nn.Embedding):
            return ("norm", mod), None, k
    return None, None, linears[first].in_features
