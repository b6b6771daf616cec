"""The main job: run every miniature reproduction and write one report (markdown, tables, plots).

Usage (from the repository root, inside .venv; scripts/reproduce.sh sets that up):
    python scripts/reproduce.py                 # everything, report in outputs/report/REPORT.md
    python scripts/reproduce.py --only llava    # one step (core, imagebind, medvlm, mmcot, llava)
    python scripts/reproduce.py --list

Each step runs in its own process so that one failure is reported without losing the others. A
package takes part once it ships ``mmr_<name>.miniature.reproduce`` (or ``mmr_<name>.reproduce``) with
``run(out_dir: Path) -> str``, which writes its plots into ``out_dir`` and returns a markdown section
whose image links are relative to it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("imagebind", "medvlm", "mmcot", "llava")
STEPS = ("core", *PACKAGES)
TITLES = {
    "core": "Shared core: 2-process DeepSpeed contrastive training on WebDataset shards",
    "imagebind": "ImageBind: emergent audio-text zero-shot",
    "medvlm": "MedVLM: attribute prompts beat class names",
    "mmcot": "Multimodal-CoT: two stages and vision features",
    "llava": "LLaVA: the instruction-tuning ablation",
}


def _find_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # a parent that is a module, not a package (e.g. an old miniature.py)
        return False


def _package_command(name: str, out_dir: Path) -> list[str] | None:
    # The miniature in its own subpackage (mmr_<name>.miniature), or beside the library before that split.
    module = next((m for m in (f"mmr_{name}.miniature.reproduce", f"mmr_{name}.reproduce") if _find_module(m)), None)
    if module is None:
        return None
    code = (
        "import sys; from pathlib import Path; "
        f"from {module} import run; "
        "out = Path(sys.argv[1]); out.mkdir(parents=True, exist_ok=True); "
        "section = run(out); (out / 'section.md').write_text(section)"
    )
    return [sys.executable, "-c", code, str(out_dir)]


def _core_command(out_dir: Path) -> list[str]:
    return [sys.executable, str(ROOT / "scripts" / "core_demo.py"), "--out", str(out_dir)]


def _relink(markdown: str, subdir: str) -> str:
    """Point a section's relative image/file links into its sub-folder of the report."""

    def fix(match: re.Match[str]) -> str:
        target = match.group(2)
        if re.match(r"^(?:[a-z]+:|/|#)", target):
            return match.group(0)
        return f"{match.group(1)}({subdir}/{target})"

    return re.sub(r"(!?\[[^\]]*\])\(([^)\s]+)\)", fix, markdown)


def _last_redraw(line: bytes) -> bytes:
    """Return what a terminal would finally show for ``line`` (the text after its last carriage return)."""
    segments = [segment for segment in line.rstrip(b"\r").split(b"\r") if segment.strip()]
    return segments[-1] if segments else b""


def run_step(name: str, out_root: Path) -> dict:
    out_dir = out_root / name
    out_dir.mkdir(parents=True, exist_ok=True)
    command = _core_command(out_dir) if name == "core" else _package_command(name, out_dir)
    if command is None:
        return {"name": name, "status": "pending", "seconds": 0.0,
                "section": f"`mmr_{name}.reproduce` does not exist yet: this package's miniature "
                           "reproduction has not landed (see the open issue)."}
    print(f"\n=== [{name}] {TITLES[name]} ===", flush=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", MPLBACKEND="Agg")
    start = time.perf_counter()
    log_path = out_dir / "log.txt"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert proc.stdout is not None
        pending = b""
        # Stream raw bytes so progress bars redraw live on the terminal, but keep only the final state of
        # each carriage-return-redrawn line in the log (otherwise every tqdm refresh becomes a log line).
        while chunk := os.read(proc.stdout.fileno(), 65536):
            sys.stdout.buffer.write(chunk)
            sys.stdout.buffer.flush()
            pending += chunk
            *complete, pending = pending.split(b"\n")
            for line in complete:
                log.write(_last_redraw(line) + b"\n")
        if pending:
            log.write(_last_redraw(pending) + b"\n")
        returncode = proc.wait()
    seconds = time.perf_counter() - start
    section_path = out_dir / "section.md"
    if returncode == 0 and section_path.is_file():
        return {"name": name, "status": "ok", "seconds": seconds, "section": _relink(section_path.read_text(), name)}
    tail = "".join(log_path.read_text().splitlines(keepends=True)[-25:])
    return {"name": name, "status": f"failed (exit {returncode})", "seconds": seconds,
            "section": f"The step failed; the end of its log (`{name}/log.txt`):\n\n```\n{tail}\n```"}


def write_report(results: list[dict], out_root: Path, total_seconds: float) -> Path:
    lines = [
        "# mmr: miniature reproductions",
        "",
        f"Generated {dt.datetime.now().isoformat(timespec='seconds')} on {platform.node()} "
        f"({platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}), "
        f"in {total_seconds / 60:.1f} minutes.",
        "",
        "| step | status | minutes |",
        "|---|---|---|",
        *[f"| [{r['name']}](#{r['name']}) | {r['status']} | {r['seconds'] / 60:.1f} |" for r in results],
        "",
    ]
    for r in results:
        lines += [f'<a id="{r["name"]}"></a>', f"## {TITLES[r['name']]}", "", r["section"].strip(), ""]
    report = out_root / "REPORT.md"
    report.write_text("\n".join(lines))
    (out_root / "summary.json").write_text(json.dumps([{k: v for k, v in r.items() if k != "section"}
                                                       for r in results], indent=2))
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=STEPS, action="append", help="run only this step (repeatable)")
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "report", help="report folder")
    parser.add_argument("--list", action="store_true", help="list the steps and whether each is available")
    args = parser.parse_args(argv)
    if args.list:
        for name in STEPS:
            ready = name == "core" or _package_command(name, args.out) is not None
            print(f"{name:10s} {'ready' if ready else 'pending'}  {TITLES[name]}")
        return 0
    steps = args.only or list(STEPS)
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    results = [run_step(name, args.out) for name in steps]
    report = write_report(results, args.out, time.perf_counter() - start)
    print(f"\nReport: {report}")
    for r in results:
        print(f"  {r['name']:10s} {r['status']:20s} {r['seconds'] / 60:5.1f} min")
    return 0 if all(r["status"] in ("ok", "pending") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
