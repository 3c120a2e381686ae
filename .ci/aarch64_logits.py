"""Logits of an ONNX export on a fixed input, and their comparison (the aarch64 job's parity).

Stdlib + numpy + onnxruntime only: it runs inside the emulated arm64 root and on the host.

    python3 aarch64_logits.py input OUT.npy                   # the fixed input (seeded)
    python3 aarch64_logits.py run MODEL.onnx INPUT.npy OUT.npy
    python3 aarch64_logits.py compare A.npy B.npy [--rtol 1e-4]
    python3 aarch64_logits.py summary FINETUNE.json           # a line for the log
    python3 aarch64_logits.py runner RUNNER_STDOUT            # checks the runner's JSON

``compare`` fails (exit 1) when max|a - b| > rtol x max(1, max|a|, max|b|), the tolerance
``wasi-tool export --atol`` uses against torch.
"""

from __future__ import annotations

import json
import sys


def main(argv: list[str]) -> int:
    import numpy as np

    if argv[:1] == ["input"] and len(argv) == 2:
        rng = np.random.default_rng(32)
        np.save(argv[1], rng.random((4, 3, 32, 32), dtype=np.float32))
        return 0
    if argv[:1] == ["run"] and len(argv) == 4:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        session = ort.InferenceSession(argv[1], options, providers=["CPUExecutionProvider"])
        x = np.load(argv[2])
        (logits,) = session.run(None, {session.get_inputs()[0].name: x})
        np.save(argv[3], logits)
        return 0
    if argv[:1] == ["compare"] and len(argv) in (3, 5):
        rtol = float(argv[4]) if len(argv) == 5 and argv[3] == "--rtol" else 1e-4
        a, b = np.load(argv[1]), np.load(argv[2])
        if a.shape != b.shape:
            print(f"FAIL: logits shapes differ: {a.shape} vs {b.shape}")
            return 1
        if not (np.isfinite(a).all() and np.isfinite(b).all()):
            print("FAIL: non-finite logits")
            return 1
        diff = float(np.abs(a.astype(np.float64) - b).max())
        scale = max(1.0, float(np.abs(a).max()), float(np.abs(b).max()))
        ok = diff <= rtol * scale
        print(
            f"{'ok' if ok else 'FAIL'}: max|logits diff| {diff:.3g} "
            f"(limit {rtol:g} x {scale:.3g} = {rtol * scale:.3g}); "
            f"top-1 equal on {int((a.argmax(1) == b.argmax(1)).sum())}/{a.shape[0]}"
        )
        return 0 if ok else 1
    if argv[:1] == ["summary"] and len(argv) == 2:
        with open(argv[1]) as fh:
            final = json.load(fh)["metrics"]["final"]
        print(f"train loss {final['train_loss']:.6f}, test accuracy {final['test_accuracy']:.4f}")
        return 0
    if argv[:1] == ["runner"] and len(argv) == 2:
        with open(argv[1]) as fh:
            out = json.loads(fh.read().strip().splitlines()[-1])
        if out.get("schema") != "wasi-tool-bench-inference/1":
            print(f"FAIL: unexpected runner output {out!r:.200}")
            return 1
        a = out["models"]["a"]
        print(
            f"{out['machine']['machine']}, onnxruntime {out['onnxruntime']}, "
            f"p50 {a['p50_ms']:.1f} ms (emulated: means nothing), +RSS {a['rss_growth_bytes']}"
        )
        return 0 if out["machine"]["machine"] == "aarch64" else 1
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
