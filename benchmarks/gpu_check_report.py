"""JUnit files for gpu_check.sh's steps and the run's summary (results JSON + markdown).

    python benchmarks/gpu_check_report.py step NAME EXIT_STATUS SECONDS LOG OUT.xml
    python benchmarks/gpu_check_report.py pytest-step NAME EXIT_STATUS SECONDS LOG JUNIT.xml
    python benchmarks/gpu_check_report.py summary WORK RESULTS GPU_NAME ARCH

Every step of the GPU script leaves a JUnit report, so a failure is named in the
results whatever killed it: ``step`` writes a one-testcase report for a step that
is not pytest (build, benchmarks, verification: failed when its exit status is not
0, with the tail of its log), ``pytest-step`` adds one when pytest left none (a
step killed by its time limit, a crash at collection). ``summary`` reads every
``junit-*.xml`` of the run and writes ``<gpu>.json`` / ``<gpu>.md`` into RESULTS:
per step its counts and the names of its failed tests, the verified kernels, the
graph-timed benchmark's tables (``suite/*.md``, ``bench/bench_cuda.md``).
"""
from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Dict, List

TIMEOUT_STATUS = (124, 137)  # timeout(1): TERM, then KILL


def _tail(log: Path, lines: int = 40) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"(no log at {log})"


def step_junit(name: str, status: int, seconds: float, log: Path, out: Path) -> None:
    """A JUnit report with one testcase, ``gpu_check.<name>``, failed unless status is 0."""
    suite = ET.Element("testsuite", name="gpu_check", tests="1", failures=str(int(status != 0)),
                       errors="0", skipped="0", time=f"{seconds:.1f}")
    case = ET.SubElement(suite, "testcase", classname="gpu_check", name=name, time=f"{seconds:.1f}")
    if status != 0:
        why = "timed out" if status in TIMEOUT_STATUS else f"exit status {status}"
        fail = ET.SubElement(case, "failure", message=f"{name}: {why}")
        fail.text = _tail(log)
    root = ET.Element("testsuites")
    root.append(suite)
    out.parent.mkdir(parents=True, exist_ok=True)
    ET.ElementTree(root).write(out, encoding="utf-8", xml_declaration=True)


def pytest_step_junit(name: str, status: int, seconds: float, log: Path, junit: Path) -> None:
    """Keeps pytest's own report; where it left none (killed, crashed before writing)
    writes a failed step in its place. Exit status 5 (no tests collected) passes."""
    if junit.exists():
        try:
            ET.parse(junit)
            return
        except ET.ParseError:
            pass
    step_junit(name, 0 if status in (0, 5) else (status or 1), seconds, log, junit)


def junit_cases(path: Path) -> List[dict]:
    """[{classname, name, status, message}] of one report (status: passed/failed/skipped)."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError) as exc:
        return [{"classname": "gpu_check", "name": path.stem, "status": "failed",
                 "message": f"unreadable report: {exc}"}]
    out = []
    for tc in root.iter("testcase"):
        status, message = "passed", ""
        for child in tc:
            if child.tag in ("failure", "error"):
                status, message = "failed", child.get("message", "")
            elif child.tag == "skipped" and status == "passed":
                status = "skipped"
        out.append({"classname": tc.get("classname", ""), "name": tc.get("name", ""), "status": status,
                    "message": message})
    return out


def steps(work: Path) -> Dict[str, dict]:
    """{step (report stem without ``junit-``): counts and failed test names}."""
    out = {}
    for path in sorted(work.glob("junit-*.xml")):
        cases = junit_cases(path)
        counts = {s: sum(c["status"] == s for c in cases) for s in ("passed", "failed", "skipped")}
        failed = [f"{c['classname']}::{c['name']}" + (f" ({c['message'][:120]})" if c["message"] else "")
                  for c in cases if c["status"] == "failed"]
        out[path.stem[len("junit-"):]] = {**counts, "failed_tests": failed}
    return out


def _load(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def summary(work: Path, results: Path, gpu: str, arch: str) -> dict:
    st = steps(work)
    suite = next((_load(p) for p in sorted((work / "suite").glob("*.json"))), None)
    result = {
        "device": gpu, "cuda_arch": arch, "steps": st,
        "failed": sorted(t for s in st.values() for t in s["failed_tests"]),
        "verified": _load(results / f"{gpu}-verified.json"),
        "suite": suite,
        "bench_cuda": _load(work / "bench" / "bench_cuda.json"),
    }
    results.mkdir(parents=True, exist_ok=True)
    (results / f"{gpu}.json").write_text(json.dumps(result, indent=1) + "\n")
    (results / f"{gpu}.md").write_text(markdown(result, work) + "\n")
    return result


def markdown(result: dict, work: Path) -> str:
    md = [f"# gpu_check on {result['device']} (arch {result['cuda_arch'] or '-'})", "",
          "| step | passed | failed | skipped |", "|---|---:|---:|---:|"]
    for name, s in result["steps"].items():
        md.append(f"| {name} | {s['passed']} | {s['failed']} | {s['skipped']} |")
    md.append("")
    if result["failed"]:
        md += ["## Failed", ""] + [f"- {t}" for t in result["failed"]] + [""]
    v = result["verified"] or {}
    md.append(f"- verified kernels: {', '.join(v.get('verified', [])) or '(none)'}")
    if v.get("failed"):
        md.append(f"- kernels with FAILED tests: {', '.join(v['failed'])}")
    if v.get("untested"):
        md.append(f"- kernels without passing tests here: {', '.join(v['untested'])}")
    md.append("")
    for part in sorted((work / "suite").glob("*.md")) + [work / "bench" / "bench_cuda.md"]:
        if part.exists() and part.stat().st_size:
            md += [part.read_text(), ""]
    return "\n".join(md)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cmd, args = argv[0], argv[1:]
    if cmd == "step":
        name, status, seconds, log, out = args
        step_junit(name, int(status), float(seconds), Path(log), Path(out))
    elif cmd == "pytest-step":
        name, status, seconds, log, junit = args
        pytest_step_junit(name, int(status), float(seconds), Path(log), Path(junit))
    elif cmd == "summary":
        work, results, gpu, arch = args
        res = summary(Path(work), Path(results), gpu, arch)
        print(markdown(res, Path(work)).split("\n## ")[0])
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
