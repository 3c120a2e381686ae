"""A peak-memory timeline of a training run's setup and first step (issue 34, items 4 and 5).

Each case runs in a fresh worker process (``--worker CASE``), the training bench's own path
(``load_model``, ``library_floor``, ``prepare_session``, the method's step), with a reading at
every phase: resident size now (VmRSS), its anonymous and file-backed parts, the phase's own
high-water mark (VmHWM, restarted at each phase through /proc/self/clear_refs), and the bytes
of every live tensor (unique storages, found through the garbage collector), less the model's
weights and buffers at that point. The preparation is split into its parts (dense targets
factored, activation ranks, layers swapped, memory plan, optimiser) by wrapping the functions
``prepare_session`` calls.

    python benchmarks/memory_timeline.py --cases vit-budget tinyllama-wasi tinyllama-vanilla \
        --json benchmarks/results/memory_timeline.json

Cases: ``vit-budget`` (ViT-B/32 224 px, batch 32, a factored artifact at rank 1/4 of all 72
block linears, wasi on all of them, ``--memory-budget 1.2GB``: benchmarks/memory_budget.py's
run) and ``tinyllama-{vanilla,wasi}`` (TinyLlama-1.1B's shapes, random init, batch 8 x 128
tokens, targets mlp@last4, every parameter training: benchmarks/llm.py's rows). The worker
runs on the allocator the training bench would start it on (jemalloc for a run that saves
memory).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
ARCH = "vit_base_patch32_224"


def status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            key = line.split(":")[0]
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                out[key] = int(line.split()[1]) * 1024
    return out


def live_tensor_bytes() -> tuple[int, int]:
    """(all live tensors, of which model parameters and buffers are not part: see caller)."""
    import warnings

    import torch

    gc.collect()
    warnings.filterwarnings("ignore")  # some objects warn when asked whether they are tensors
    seen: dict[int, int] = {}
    seen_params = [o for o in gc.get_objects() if isinstance(o, torch.nn.Parameter)]
    for obj in gc.get_objects():
        try:
            if isinstance(obj, torch.Tensor) and not obj.is_meta:
                s = obj.untyped_storage()
                if s.data_ptr():
                    seen[s.data_ptr()] = s.nbytes()
        except Exception:
            continue
    for obj in list(seen_params):  # gradients made by autograd have no Python object yet
        grad = obj.grad
        if grad is not None and grad.untyped_storage().data_ptr():
            seen[grad.untyped_storage().data_ptr()] = grad.untyped_storage().nbytes()
    return sum(seen.values()), len(seen)


class Timeline:
    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []
        self.model: Any = None
        self.with_live = True

    def reset(self) -> None:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")

    def mark(self, phase: str) -> None:
        st = status()
        row: dict[str, Any] = {
            "phase": phase,
            "rss": st["VmRSS"],
            "phase_hwm": st["VmHWM"],
            "anon": st["RssAnon"],
            "file": st["RssFile"] + st.get("RssShmem", 0),
            "dynamo_imported": "torch._dynamo" in sys.modules,
            "transformers_imported": "transformers" in sys.modules,
            "sympy_imported": "sympy" in sys.modules,
        }
        if self.with_live:
            import torch

            live, _ = live_tensor_bytes()
            row["live_tensors"] = live
            if self.model is not None:
                row["weights"] = sum(
                    t.numel() * t.element_size()
                    for t in self.model.state_dict().values()
                    if isinstance(t, torch.Tensor) and not t.is_meta
                )
        self.rows.append(row)
        print(
            f"{phase:38s} rss {row['rss'] / 1e9:6.3f}  phase hwm {row['phase_hwm'] / 1e9:6.3f}  "
            f"anon {row['anon'] / 1e9:6.3f}  live {row.get('live_tensors', 0) / 1e9:6.3f}  "
            f"weights {row.get('weights', 0) / 1e9:6.3f}"
            f"{'  dynamo' if row['dynamo_imported'] else ''}",
            file=sys.stderr,
            flush=True,
        )
        self.reset()


@contextlib.contextmanager
def wrapped(obj: Any, name: str, tl: Timeline, label: str) -> Iterator[None]:
    """Mark ``label`` after every call of ``obj.name``."""
    original = getattr(obj, name)

    def call(*args: Any, **kwargs: Any) -> Any:
        out = original(*args, **kwargs)
        tl.mark(label)
        return out

    setattr(obj, name, call)
    try:
        yield
    finally:
        setattr(obj, name, original)


def worker(case: str, checkpoint: str | None, budget: str | None) -> dict[str, Any]:
    tl = Timeline()
    tl.reset()
    t0 = time.perf_counter()
    import torch

    tl.mark("import torch")
    from wasi_tool.allocator import follow_live_memory, in_use
    from wasi_tool.bench import train as bench
    from wasi_tool.measure import library_floor
    from wasi_tool.models.loading import ModelSource, load_model
    from wasi_tool.training import prepare as prep
    from wasi_tool.training import session as sess

    if case == "vit-budget":
        cfg = bench.TrainBenchConfig(
            checkpoint=checkpoint,
            method="wasi",
            targets="all",
            batch_size=32,
            steps=1,
            warmup=0,
            memory_budget=budget,
        )
    else:
        cfg = bench.TrainBenchConfig(
            checkpoint=checkpoint,
            random_init=True,
            method=case.split("-", 1)[1],
            targets="mlp@last4",
            batch_size=8,
            seq_len=128,
            steps=1,
            warmup=0,
        )
    allocator = follow_live_memory() if cfg.saves_memory else in_use()
    torch.manual_seed(cfg.seed)
    tl.mark("import wasi_tool (bench worker's modules)")
    if case == "vit-budget":  # the model's own library: the import floor is measured with it
        from wasi_tool.models.timm_import import import_timm

        import_timm()
        tl.mark("import timm (the import floor)")
    src = ModelSource(
        checkpoint=Path(cfg.checkpoint) if cfg.checkpoint else None,
        random_init=cfg.random_init,
        seed=cfg.seed,
    )
    loaded = load_model(src)
    model = tl.model = loaded.model
    tl.mark("model built / loaded")
    floor = library_floor(model)
    tl.mark("library_floor read")
    x, y = bench._synthetic_batch(loaded, cfg)
    batch_bytes = sum(t.numel() * t.element_size() for t in (x, y))
    settings = cfg.method_config()
    rule = None if settings.act_ranks is not None else "shape"
    with contextlib.ExitStack() as stack:
        stack.enter_context(wrapped(prep, "compress_", tl, "prepare: dense targets factored"))
        stack.enter_context(wrapped(sess, "choose_act_ranks", tl, "prepare: activation ranks"))
        stack.enter_context(wrapped(prep, "prepare_", tl, "prepare: layers swapped"))
        stack.enter_context(wrapped(sess, "prepare_for_training", tl, "prepare: memory mode"))
        stack.enter_context(wrapped(sess, "plan_memory", tl, "memory plan (probe steps)"))
        session = sess.prepare_session(
            model, settings, lambda: (x, y), rule=rule, loaded=loaded, floor=floor
        )
    tl.mark("optimiser built (session ready)")
    from wasi_tool.training.loss import task_loss

    opt = session.optimizer
    for step in (1, 2) if case == "vit-budget" else (1,):  # TinyLlama: 14 GB in one step
        logits = model(x)
        loss = task_loss(logits, y)
        tl.mark(f"step {step}: forward")
        opt.zero_grad()
        loss.backward()
        del loss, logits
        tl.mark(f"step {step}: backward")
        opt.step()
        tl.mark(f"step {step}: update")
    plan = session.plan.to_dict() if session.plan else None
    by_phase = {r["phase"]: r for r in tl.rows}
    start = by_phase["optimiser built (session ready)"]
    imported = by_phase.get("import timm (the import floor)")
    floors: dict[str, Any] = {}
    if imported is not None:  # issue 34: the floor as training starts vs the import floor
        at_start = start["rss"] - start.get("weights", 0)
        floors = {
            "import_floor_bytes": imported["rss"],
            "floor_at_training_start_bytes": at_start,
            "above_import_floor_bytes": at_start - imported["rss"],
            "input_batch_bytes": batch_bytes,
        }
        print(
            f"floor at the start of training (resident less the weights) "
            f"{at_start / 1e9:.3f} GB, import floor {imported['rss'] / 1e9:.3f} GB: "
            f"+{(at_start - imported['rss']) / 1e9:.3f} GB (of which the input batch "
            f"{batch_bytes / 1e9:.3f} GB)",
            file=sys.stderr,
        )
    return {
        "case": case,
        "allocator": allocator,
        **floors,
        "floor_rss_bytes": floor,
        "plan": plan,
        "seconds": round(time.perf_counter() - t0, 1),
        "timeline": tl.rows,
        "peak_rss_bytes": max(r["phase_hwm"] for r in tl.rows),
    }


def tinyllama_dir(work: Path) -> Path:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from llm import TINYLLAMA  # the config typed into benchmarks/llm.py

    config = dict(TINYLLAMA)
    if os.environ.get("TIMELINE_LAYERS"):  # a quick look at fewer layers (not a row)
        config["num_hidden_layers"] = int(os.environ["TIMELINE_LAYERS"])
    d = work / "tinyllama-config"
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(config, indent=1))
    return d


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", nargs="+", default=["vit-budget"])
    ap.add_argument("--budget", default="1.2GB")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--checkpoint", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.checkpoint, args.budget)))
        return
    from wasi_tool.allocator import worker_env

    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        vit = None
        for case in args.cases:
            if case == "vit-budget" and vit is None:
                from wasi_tool.models import ModelSource
                from wasi_tool.stages import CompressConfig, run_compress

                src = ModelSource(random_init=True, arch=ARCH)
                vit = run_compress(src, CompressConfig(targets="all", rank_ratio=0.25), work / "m")
            ckpt = str(vit.out) if case == "vit-budget" else str(tinyllama_dir(work))
            env, name = worker_env("auto")
            cmd = [sys.executable, __file__, "--worker", case, "--checkpoint", ckpt]
            cmd += ["--budget", args.budget]
            print(f"{case}: fresh worker on {name}", file=sys.stderr, flush=True)
            proc = subprocess.run(
                cmd, stdout=subprocess.PIPE, text=True, env={**os.environ, **env}, check=False
            )
            lines = proc.stdout.strip().splitlines()
            if proc.returncode != 0 or not lines:
                results[case] = {"error": f"exit {proc.returncode}"}
                continue
            results[case] = json.loads(lines[-1])
    if args.json:
        previous = json.loads(args.json.read_text()) if args.json.is_file() else {}
        previous.update(results)
        args.json.write_text(json.dumps(previous, indent=1) + "\n")


if __name__ == "__main__":
    main()
