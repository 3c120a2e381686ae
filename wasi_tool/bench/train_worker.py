"""The training bench's worker process: ``python -m wasi_tool.bench.train_worker CONFIG_JSON``.

Measures one method (wasi_tool.bench.train.measure) and prints one JSON object; a user error is
one line on stderr and exit code 1.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict

from wasi_tool.bench.train import TrainBenchConfig, measure
from wasi_tool.errors import WasiToolError


def main() -> None:
    try:
        result = measure(TrainBenchConfig.from_dict(json.loads(sys.argv[1])))
    except WasiToolError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    print(json.dumps(asdict(result)))


if __name__ == "__main__":
    main()
