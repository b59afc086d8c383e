"""Model surgery and input capture: which layers, which blocks, and what flows into them.

Calibrated methods run the model once up to its first decoder block (the
embeddings) to capture that block's inputs and keyword arguments (attention
mask, rotary embeddings); each block's outputs are the next block's inputs.
Within a block, the linear layers that read the same input tensor form a group
(Llama: q/k/v, o, gate/up, down), found by one forward pass with hooks, so any
decoder architecture works.
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..errors import DtypeError, FormatError, ShapeError, ValueRangeError
from ..nn.quant_linear import QuantLinear, default_filter


class StopForward(Exception):
    """Raised by a hook to end a forward pass once the input it wanted was seen."""


# --- the model's structure ---------------------------------------------------------
def select_targets(model: nn.Module, filter) -> Dict[str, nn.Linear]:
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


def find_blocks(model: nn.Module) -> Tuple[str, nn.ModuleList]:
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


def set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def move_outside(module: nn.Module, blocks: nn.Module, device) -> None:
    """Move everything but the decoder blocks to ``device`` (embeddings, rotary tables)."""
    for child in module.children():
        if child is blocks:
            continue
        if any(m is blocks for m in child.modules()):
            move_outside(child, blocks, device)
        else:
            child.to(device)
    for key, p in list(module._parameters.items()):
        if p is not None:
            p.data = p.data.to(device)
    for key, b in list(module._buffers.items()):
        if b is not None:
            module._buffers[key] = b.to(device)


# --- calibration data ----------------------------------------------------------------
def calibration_batches(data, batch_size: int, min_tokens: int, vocab_size: Optional[int]) -> List[torch.Tensor]:
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


def vocab_size(model: nn.Module) -> Optional[int]:
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return getattr(emb, "num_embeddings", None) if emb is not None else None


def capture_first_block(model, blocks, batches, device):
    """The first block's input and keyword arguments for each calibration batch."""
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
        raise StopForward

    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for b in batches:
            try:
                try:
                    model(input_ids=b.to(device), use_cache=False)
                except TypeError:
                    model(b.to(device))
            except StopForward:
                pass
    finally:
        handle.remove()
    if len(inps) != len(batches):
        raise FormatError("quantize_model: the model's forward never reached its first decoder block")
    return inps, kws


# --- inside a block ------------------------------------------------------------------
def first_output(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def run_block(block, x, kw):
    return first_output(block(x, **kw))


def first_sample(x, kw):
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


def input_groups(block: nn.Module, x, kw) -> Tuple[List[List[str]], Dict[str, Optional[str]], Dict[str, nn.Linear]]:
    """Linear layers of ``block`` grouped by identical input tensor, in execution
    order, plus for each group (keyed by its first layer) the name of the module
    whose output is that input (None when it is not a module output), and the
    block's linear layers by name."""
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
        keep.append(block(x, **kw))
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
    return groups, group_producer, linears


def on_one_sequence(fn, x, kw):
    """``fn(x, kw)`` on batch row 0 of a captured batch (see :func:`first_sample`),
    or on the whole batch when a keyword argument is not batch-major."""
    try:
        return fn(*first_sample(x, kw))
    except (RuntimeError, ValueError, IndexError):
        return fn(x, kw)


def block_groups(block: nn.Module, x, kw):
    """:func:`input_groups` on one sequence of a captured batch."""
    return on_one_sequence(lambda x1, kw1: input_groups(block, x1, kw1), x, kw)


def accumulate(block, layer: nn.Module, inps, kws, acc, stop: bool = True):
    """Feed ``layer``'s input on each calibration batch to ``acc``; with ``stop``
    the forward ends there (nothing after the layer is computed)."""
    def hook(m, args):
        acc.add(args[0])
        if stop:
            raise StopForward

    h = layer.register_forward_pre_hook(hook)
    try:
        for x, kw in zip(inps, kws):
            try:
                block(x, **kw)
            except StopForward:
                pass
    finally:
        h.remove()


def accumulate_all(block, pairs, inps, kws):
    """One full pass of ``block`` over the calibration inputs, feeding the input
    of each ``(layer, accumulator)`` pair to its accumulator."""
    handles = [layer.register_forward_pre_hook(lambda m, a, acc=acc: acc.add(a[0])) for layer, acc in pairs]
    try:
        for x, kw in zip(inps, kws):
            block(x, **kw)
    finally:
        for h in handles:
            h.remove()


def group_accumulator(linears, prefix: str, group: Sequence[str], **kw):
    """The input statistics of ``group`` (layers sharing one input), named after its first layer."""
    from ..algorithms.hessian import HessianAccumulator

    lin = linears[group[0]]
    return HessianAccumulator(lin.in_features, device=lin.weight.device, name=f"{prefix}.{group[0]}", **kw)


def layer_inputs(block, x, kw, layers: Dict[str, nn.Module]):
    """One forward of ``block``: its output and the input of each of ``layers``
    at its first call (a layer called more than once keeps the first)."""
    seen: Dict[str, torch.Tensor] = {}
    handles = [m.register_forward_pre_hook(lambda mod, a, n=n: seen.setdefault(n, a[0].detach()))
               for n, m in layers.items()]
    try:
        out = run_block(block, x, kw)
    finally:
        for h in handles:
            h.remove()
    return out, seen
