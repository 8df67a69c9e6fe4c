"""Stop signals at random moments: each command is started again and again over an earlier
complete output in ``--out`` and sent SIGINT, SIGTERM or SIGKILL at a random time between its
start and a little after its usual end. Each try checks what the guarantees promise:

- SIGINT / SIGTERM: exit 130 / 143 with the previous ``--out`` byte for byte as it was, or exit 0
  with the new output complete (the signal landed during or after the swap); never a traceback,
  and no staging directory left;
- SIGKILL: the previous ``--out`` untouched or the new one complete (never a half-replaced one);
  the staging directory it leaves is removed by the next run into the same place (a quick scan),
  which then succeeds.

Prints a table and writes ``benchmarks/results/signals.json``.

Run: ``python benchmarks/signals.py [--tries 20] [--commands scan,validate,circuit]`` (about 25
minutes on 2 busy CPU cores with the defaults: 180 runs plus the runs after each SIGKILL).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "signals.json"
MODEL = ROOT / "models" / "attn-only-2l-induction"
CONSOLE = Path(sys.executable).parent / "attrpatch"
# as a launcher that leaves the stop signals at their defaults starts it
DEFAULT_SIGNALS = [sys.executable, "-c", "import os, signal, sys\n"
                   "for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):\n"
                   "    signal.signal(s, signal.SIG_DFL)\n"
                   "os.execv(sys.argv[1], sys.argv[1:])"]
QUICK_SCAN = ["scan", "--model", str(MODEL), "--data", str(MODEL / "attrpatch_task.json"),
              "--methods", "atp", "--sites", "z", "--quiet"]
COMMANDS = {  # name -> the command line, given --out
    "scan": lambda out: ["scan", "--model", str(MODEL), "--data", str(MODEL / "attrpatch_task.json"),
                         "--sites", "z", "--quiet", "--out", str(out)],
    "validate": lambda out: ["validate", str(out), "--threshold", "large=0.2"],
    "circuit": lambda out: ["circuit", "--model", str(MODEL), "--method", "eap", "--edges", "20",
                            "--quiet", "--out", str(out)],
}
SIGNALS = {"SIGINT": signal.SIGINT, "SIGTERM": signal.SIGTERM, "SIGKILL": signal.SIGKILL}


def _run(args: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen([*DEFAULT_SIGNALS, str(CONSOLE), *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _contents(directory: Path) -> dict[str, bytes] | None:
    return {p.name: p.read_bytes() for p in directory.iterdir()} if directory.is_dir() else None


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.endswith((".staging", ".old")))


def _state(out: Path, before: dict) -> str:
    """untouched (as before), complete (a whole new output), or damaged."""
    now = _contents(out)
    if now == before:
        return "untouched"
    try:
        files = json.loads(now["summary.json"])["files"]
    except (TypeError, KeyError, ValueError):
        return "damaged"
    return "complete" if sorted(files) == sorted(now) else "damaged"


def _try(name: str, signame: str, at: float, previous: Path, work: Path, env: dict) -> dict:
    """One run of `name` over a copy of `previous`, sent `signame` `at` seconds after its start."""
    place = work / "try"
    shutil.rmtree(place, ignore_errors=True)
    place.mkdir()
    out = place / "out"
    shutil.copytree(previous, out)
    before = _contents(out)
    proc = _run(COMMANDS[name](out), env)
    t0 = time.monotonic()
    while proc.poll() is None and time.monotonic() - t0 < at:
        time.sleep(0.002)
    sent = proc.poll() is None
    if sent:
        proc.send_signal(SIGNALS[signame])
    _, err = proc.communicate(timeout=600)
    row = {"at_s": round(at, 3), "sent": sent, "exit": proc.returncode, "state": _state(out, before),
           "traceback": "Traceback" in err or "Fatal Python error" in err,
           "leftovers": _leftovers(place), "err_tail": err.strip().splitlines()[-1:] if err else []}
    if row["leftovers"]:  # the next run into the same place removes them
        nxt = _run([*QUICK_SCAN, "--out", str(out)], env)
        _, next_err = nxt.communicate(timeout=600)
        row |= {"next_exit": nxt.returncode, "next_note": "note: removed" in next_err,
                "leftovers_after_next": _leftovers(place), "next_state": _state(out, before)}
    row["ok"] = _judge(signame, row)
    return row


def _judge(signame: str, row: dict) -> bool:
    """Whether the try kept the promises (see the module docstring). A SIGTERM that lands
    before the command installs its handler (its first ~0.1 s) kills it by the default action:
    exit -15 (the shell reports 143), nothing written; counted as kept, and shown apart."""
    if row["traceback"] or row["state"] == "damaged":
        return False
    if not row["sent"] or row["exit"] == 0:  # finished first, or the signal came after the swap
        return row["state"] == "complete" and not row["leftovers"]
    if signame == "SIGKILL":
        return (row["exit"] == -signal.SIGKILL
                and (not row["leftovers"] or (row["next_exit"] == 0 and not row["leftovers_after_next"]
                                              and row["next_state"] == "complete")))
    return (row["exit"] in (128 + SIGNALS[signame], -SIGNALS[signame]) and row["state"] == "untouched"
            and not row["leftovers"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tries", type=int, default=20, help="runs per command and signal")
    parser.add_argument("--commands", default=",".join(COMMANDS))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="attrpatch-signals-"))
    # the compilation cache on, as users have it, in a folder of its own
    env = dict(os.environ, MPLBACKEND="Agg", ATTRPATCH_CACHE_DIR=str(work / "cache"))
    env.pop("ATTRPATCH_COMPILE_CACHE", None)
    rows, summary = {}, {}
    for name in args.commands.split(","):
        previous = work / f"previous-{name}"
        first = COMMANDS["scan" if name == "validate" else name](previous)
        subprocess.run([str(CONSOLE), *first], env=env, check=True, capture_output=True)
        t0 = time.monotonic()  # a warm, uninterrupted run: how long the command takes
        scratch = work / "scratch"
        shutil.rmtree(scratch, ignore_errors=True)
        shutil.copytree(previous, scratch)
        subprocess.run([str(CONSOLE), *COMMANDS[name](scratch)], env=env, check=True,
                       capture_output=True)
        duration = time.monotonic() - t0
        for signame in SIGNALS:
            tries = [_try(name, signame, rng.uniform(0, 1.1 * duration), previous, work, env)
                     for _ in range(args.tries)]
            rows[f"{name}/{signame}"] = tries
            summary[f"{name}/{signame}"] = {
                "command_s": round(duration, 2), "tries": len(tries), "ok": sum(r["ok"] for r in tries),
                "exits": dict(Counter(str(r["exit"]) if r["sent"] else "0 (done first)" for r in tries)),
                "states": dict(Counter(r["state"] for r in tries)),
                "tracebacks": sum(r["traceback"] for r in tries),
                "left_staging": sum(bool(r["leftovers"]) for r in tries),
                "left_after_next_run": sum(bool(r.get("leftovers_after_next")) for r in tries),
            }
            print(f"{name} {signame}: {summary[f'{name}/{signame}']}", file=sys.stderr)
    print("| command | signal | tries | ok | exit statuses | --out after | tracebacks | "
          "staging left | left after next run |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for key, s in summary.items():
        name, signame = key.split("/")
        exits = ", ".join(f"{k}: {v}" for k, v in sorted(s["exits"].items()))
        states = ", ".join(f"{k} {v}" for k, v in sorted(s["states"].items()))
        print(f"| {name} ({s['command_s']:.0f} s) | {signame} | {s['tries']} | {s['ok']} | {exits} | "
              f"{states} | {s['tracebacks']} | {s['left_staging']} | {s['left_after_next_run']} |")
    RESULTS.parent.mkdir(exist_ok=True)
    tmp = RESULTS.with_suffix(".tmp")
    tmp.write_text(json.dumps({"seed": args.seed, "summary": summary, "tries": rows}, indent=1))
    tmp.replace(RESULTS)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
