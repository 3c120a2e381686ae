"""The training bench's worker process: ``python -m wasi_tool.bench.train_worker CONFIG_JSON``.

Measures one method (wasi_tool.bench.train.measure) and prints one JSON object, with the OpenMP
wait policy its torch started with; a user error is one line on stderr and exit code 1.
"""

from __future__ import annotations

import dataclasses
import json
import sys

from wasi_tool.errors import WasiToolError
from wasi_tool.threads import set_wait_policy


def main() -> None:
    # before torch loads (wasi_tool.bench.train imports it): the parent's policy, else the default
    policy = set_wait_policy()
    from wasi_tool.bench.train import TrainBenchConfig, measure

    try:
        result = measure(TrainBenchConfig.from_dict(json.loads(sys.argv[1])))
    except WasiToolError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    print(json.dumps(dataclasses.asdict(dataclasses.replace(result, wait_policy=policy))))


if __name__ == "__main__":
    main()
