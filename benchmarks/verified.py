"""Which GPU kernels passed their tests on a real device, and the file that
lets default dispatch use them (DESIGN.md rule 6).

Which tests belong to which kernel (the kernel names are those given to
``register_kernel``, e.g. ``cuda_int4_gemv``):

* a test function named ``test_K`` or ``test_K_...`` tests kernel ``K``;
* otherwise every test of a module that declares, at top level,
  ``GPU_KERNELS = ("K1", "K2", ...)`` tests all of those kernels.

A kernel is verified on a device when at least one of its tests passed there
and none failed or errored (skips count for nothing). Only a run on a GPU
verifies anything (``--no-gpu`` records the counts and verifies nothing).

    # on the GPU machine, after pytest --junitxml=junit.xml tests/gpu
    python benchmarks/verified.py from-junit junit.xml --device NVIDIA_H100_80GB_HBM3 \\
        --out benchmarks/results/NVIDIA_H100_80GB_HBM3-verified.json
    # then, reviewed and committed by a developer:
    python benchmarks/verified.py apply benchmarks/results/NVIDIA_H100_80GB_HBM3-verified.json
    # the source hashes of today's checkout (what a run would record)
    python benchmarks/verified.py hashes

Verified means verified: ``from-junit`` records, for every kernel, the SHA-256 of
the source it was built from in this checkout (``pyquant.ops.kernel_sources``:
the ``.cu`` file and its headers, or the Triton modules), and ``apply`` writes it
into the kernel's entry of ``verified_kernels.json``. Dispatch counts an entry only
while today's source has the same hash, so a kernel edited after its GPU run is
experimental again until the next run passes it.
"""
from __future__ import annotations

import argparse
import ast
import datetime
import functools
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Dict, Iterable, List

ROOT = Path(__file__).resolve().parents[1]
VERIFIED_FILE = ROOT / "pyquant" / "ops" / "verified_kernels.json"
GPU_BACKENDS = ("cuda", "triton")


def gpu_kernel_names() -> List[str]:
    """Names of every registered CUDA and Triton kernel (imports pyquant)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from pyquant.ops.dispatch import registered

    names = set()
    for (op, backend), ks in registered().items():
        if backend in GPU_BACKENDS:
            names.update(ks)
    return sorted(names)


def source_hashes(kernels: Iterable[str]) -> Dict[str, object]:
    """{kernel: SHA-256 of its source in this checkout, or None where not on disk}."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from pyquant.ops.dispatch import source_hash

    return {k: source_hash(k) for k in kernels}


def testcases(junit_paths: Iterable[str]):
    """Yields (classname, function name, status) for every testcase; status is
    one of passed / failed / skipped."""
    for path in junit_paths:
        try:
            root = ET.parse(path).getroot()
        except (OSError, ET.ParseError) as exc:  # a step killed before pytest wrote its report
            print(f"verified.py: skipping {path}: {exc}", file=sys.stderr)
            continue
        for tc in root.iter("testcase"):
            name = tc.get("name", "").split("[", 1)[0]
            tags = {child.tag for child in tc}
            if tags & {"failure", "error"}:
                status = "failed"
            elif "skipped" in tags:
                status = "skipped"
            else:
                status = "passed"
            yield tc.get("classname", ""), name, status


@functools.lru_cache(maxsize=None)
def _module_kernels(path: Path) -> tuple:
    try:
        tree = ast.parse(path.read_text())
    except (OSError, SyntaxError):
        return ()
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "GPU_KERNELS" for t in node.targets):
            try:
                return tuple(ast.literal_eval(node.value))
            except ValueError:
                return ()
    return ()


def declared_kernels(classname: str, root: Path = ROOT) -> tuple:
    """GPU_KERNELS of the test module named by a junit classname
    (``tests.triton.test_x`` or ``tests.triton.test_x.TestClass``)."""
    parts = [p for p in classname.split(".") if p]
    for i in range(len(parts), 0, -1):
        path = root.joinpath(*parts[:i]).with_suffix(".py")
        if path.is_file():
            return _module_kernels(path)
    return ()


def kernel_of(test_name: str, kernels: List[str]):
    """The kernel a test function belongs to (longest matching name), or None."""
    best = None
    for k in kernels:
        prefix = f"test_{k}"
        if (test_name == prefix or test_name.startswith(prefix + "_")) and (best is None or len(k) > len(best)):
            best = k
    return best


def summarize(junit_paths: Iterable[str], kernels: List[str], root: Path = ROOT, gpu: bool = True) -> Dict:
    counts = {k: {"passed": 0, "failed": 0, "skipped": 0} for k in kernels}
    for classname, name, status in testcases(junit_paths):
        k = kernel_of(name, kernels)
        owners = [k] if k is not None else [d for d in declared_kernels(classname, root) if d in counts]
        for owner in owners:
            counts[owner][status] += 1
    verified = sorted(k for k, c in counts.items() if gpu and c["passed"] > 0 and c["failed"] == 0)
    failed = sorted(k for k, c in counts.items() if c["failed"] > 0)
    untested = sorted(k for k, c in counts.items() if c["passed"] == 0 and c["failed"] == 0)
    return {"kernels": counts, "verified": verified, "failed": failed, "untested": untested}


def from_junit(args) -> int:
    kernels = args.kernels.split(",") if args.kernels else gpu_kernel_names()
    result = summarize(args.junit, kernels, gpu=not args.no_gpu)
    result = {
        "device": args.device,
        "gpu": not args.no_gpu,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "junit": [str(p) for p in args.junit],
        **result,
        "sources": source_hashes(kernels),
    }
    if args.extra:
        result.update(json.loads(args.extra))
    text = json.dumps(result, indent=1)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    print(f"verified: {', '.join(result['verified']) or '(none)'}")
    if result["failed"]:
        print(f"FAILED:   {', '.join(result['failed'])}")
    if result["untested"]:
        print(f"untested: {', '.join(result['untested'])}")
    return 0


def read_entries(path: Path) -> Dict[str, dict]:
    """Kernel entries of a verified_kernels.json; the older layout (a ``verified``
    list, no source hashes) reads as entries without a hash (not verified)."""
    if not path.exists():
        return {}
    data = json.loads(path.read_text())
    if "kernels" in data:
        return dict(data["kernels"])
    evidence = data.get("evidence", {})
    out = {}
    for k in data.get("verified", []):
        device, _, date = evidence.get(k, "").partition(" ")
        out[k] = {"device": device or None, "date": date or None, "source_sha256": None}
    return out


def apply(args) -> int:
    """Merge a device's results into verified_kernels.json: kernels verified
    there are added with the source hash of that run, kernels that failed there
    are removed."""
    res = json.loads(Path(args.results).read_text())
    if not res.get("gpu", True):
        print(f"{args.results} comes from a run without a GPU: nothing to apply", file=sys.stderr)
        return 1
    target = Path(args.file)
    entries = read_entries(target)
    sources = res.get("sources", {})
    for k in res.get("verified", []):
        entries[k] = {"device": res.get("device"), "date": res.get("date"), "source_sha256": sources.get(k)}
    for k in res.get("failed", []):
        entries.pop(k, None)
    out = {"note": NOTE, "kernels": {k: entries[k] for k in sorted(entries)}}
    target.write_text(json.dumps(out, indent=1) + "\n")
    for k, v in out["kernels"].items():
        print(f"{target}: {k} source {(v.get('source_sha256') or 'not recorded')[:16]}")
    return 0


NOTE = ("GPU kernels that passed their tests on a device, with the SHA-256 of the source they were built from "
        "(benchmarks/verified.py); dispatch uses an entry only while today's source has that hash")


def hashes(args) -> int:
    for k, h in source_hashes(gpu_kernel_names()).items():
        print(f"{k}: {h or '(source not on disk)'}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("from-junit", help="junit XML(s) of a GPU test run -> verified-kernels JSON")
    a.add_argument("junit", nargs="*", help="JUnit XML reports (none: every kernel untested)")
    a.add_argument("--device", default="unknown")
    a.add_argument("--out")
    a.add_argument("--kernels", help="comma-separated kernel names (default: every registered CUDA/Triton kernel)")
    a.add_argument("--extra", help="JSON object merged into the output (build info, ...)")
    a.add_argument("--no-gpu", action="store_true", help="the tests ran without a GPU: verify nothing")
    b = sub.add_parser("apply", help="merge a verified-kernels JSON into pyquant/ops/verified_kernels.json")
    b.add_argument("results")
    b.add_argument("--file", default=str(VERIFIED_FILE))
    sub.add_parser("hashes", help="print the source hash of every GPU kernel in this checkout")
    args = ap.parse_args(argv)
    return {"from-junit": from_junit, "apply": apply, "hashes": hashes}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
