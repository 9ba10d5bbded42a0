"""Print every preset's parameters, multiply-adds and input size (``--json`` for machines).

python -m igcv2.summary [--json]
"""

from __future__ import annotations

import argparse
import json
import sys

from igcv2.complexity import count_macs, count_params
from igcv2.networks import PRESETS, build


def preset_table() -> list[dict[str, object]]:
    rows = []
    for name, (builder, kwargs, size) in PRESETS.items():
        model = build(builder, **kwargs)
        rows.append(
            {
                "preset": name,
                "builder": builder,
                "kwargs": kwargs,
                "input": list(size),
                "params": count_params(model),
                "macs": count_macs(model, size),
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m igcv2.summary", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    args = parser.parse_args(argv)
    rows = preset_table()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'preset':<16}{'builder':<16}{'input':>14}{'params':>12}{'MACs':>12}")
    for r in rows:
        size = "x".join(map(str, r["input"]))
        print(f"{r['preset']:<16}{r['builder']:<16}{size:>14}{r['params'] / 1e6:>11.3f}M{r['macs'] / 1e6:>11.1f}M")
    return 0


if __name__ == "__main__":
    sys.exit(main())
