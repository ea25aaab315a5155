"""`make bench`: speed and quality figures measured as ratios within one run (this machine is noisy).

    python -m bench              # every entry
    python -m bench synth runtime  # only these

Each entry is a module ``bench/<name>.py`` with ``main() -> dict`` that prints what it measured
and returns the figures; the whole run is written to ``runs/bench/results.json``.
"""
from __future__ import annotations

import importlib
import json
import os
import sys
import time
from pathlib import Path

ENTRIES = [p.stem for p in sorted(Path(__file__).parent.glob("*.py")) if not p.stem.startswith("_")]


def main(argv: list[str]) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    names = argv or ENTRIES
    unknown = [n for n in names if n not in ENTRIES]
    if unknown:
        print(f"unknown bench entries {unknown}; available: {ENTRIES}", file=sys.stderr)
        return 2
    results = {}
    for name in names:
        print(f"== bench {name}", flush=True)
        t0 = time.perf_counter()
        results[name] = importlib.import_module(f"bench.{name}").main()
        print(f"== bench {name}: {time.perf_counter() - t0:.1f}s", flush=True)
    out = Path("runs/bench/results.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
