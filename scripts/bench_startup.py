"""Start-up time of the `abliterate` command: wall seconds of `abliterate --help` and `abliterate run --help`.

Each command runs as a subprocess REPEATS times; prints JSON with the median wall time (and the median
CPU time of the child, which is less disturbed by other load on a shared machine).

    python scripts/bench_startup.py [--repeats 3]
"""

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

COMMANDS = (["--help"], ["run", "--help"])


def entry_point() -> list[str]:
    """The installed `abliterate` script next to this interpreter, else `python -m abliterate`."""
    script = Path(sys.executable).with_name("abliterate")
    if script.exists():
        return [str(script)]
    found = shutil.which("abliterate")
    return [found] if found else [sys.executable, "-m", "abliterate"]


def time_once(cmd: list[str], env: dict) -> tuple[float, float]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    repeats = parser.parse_args().repeats
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "HF_HUB_OFFLINE": "1"}
    base = entry_point()
    result = {"entry_point": " ".join(base), "repeats": repeats}
    for args in COMMANDS:
        runs = [time_once(base + args, env) for _ in range(repeats)]
        name = "abliterate " + " ".join(args)
        result[name] = {
            "wall_s": round(statistics.median(r[0] for r in runs), 3),
            "cpu_s": round(statistics.median(r[1] for r in runs), 3),
        }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
