"""The persistent compilation cache: ``attrpatch demo`` with ``--no-compile-cache``, then cold
(empty cache), then again (every computation compiled by the first run); each a fresh process,
the same command otherwise, after one untimed run that warms the OS's file cache.
Writes ``benchmarks/results/compile_cache.json``.

Run: ``python benchmarks/bench_compile_cache.py`` (about 5 minutes on 2 CPU cores).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "compile_cache.json"


def _demo(cache: Path, out: Path, *flags: str) -> float:
    env = dict(os.environ, ATTRPATCH_CACHE_DIR=str(cache))
    env.pop("ATTRPATCH_COMPILE_CACHE", None)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "attrpatch", "demo", "--quiet", "--out", str(out), *flags],
                   check=True, env=env, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="attrpatch-cache-"))
    cache = work / "cache"
    _demo(work / "warmup", work / "w", "--no-compile-cache")  # the OS caches Python's imports
    rows = {"no_cache_s": _demo(work / "unused", work / "c", "--no-compile-cache"),
            "cold_s": _demo(cache, work / "a"), "cached_s": _demo(cache, work / "b")}
    rows["cache_files"] = sum(1 for _ in (cache / "jax").iterdir())
    rows["cache_mib"] = sum(p.stat().st_size for p in (cache / "jax").iterdir()) / 2**20
    rows["speedup"] = rows["cold_s"] / rows["cached_s"]
    print("| run | seconds |\n| --- | --- |")
    for k in ("cold_s", "cached_s", "no_cache_s"):
        print(f"| demo, {k[:-2].replace('_', ' ')} | {rows[k]:.1f} |")
    print(f"\ncached run {rows['speedup']:.1f}x faster; cache {rows['cache_files']} files, "
          f"{rows['cache_mib']:.1f} MiB")
    tmp = RESULTS.with_suffix(".tmp")
    tmp.write_text(json.dumps(rows, indent=1))
    tmp.replace(RESULTS)


if __name__ == "__main__":
    main()
