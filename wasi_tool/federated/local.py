"""One participant's model: built exactly as ``finetune`` builds it (load, fit the head,
prepare for the method), and one round of local training through the same Trainer.

No Flower here: the ClientApp and the simulation call these functions, and so do the tests.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import ConcatDataset, Dataset, Subset

from wasi_tool.data import batch_transform
from wasi_tool.data.datasets import DataSplits, _labels_of
from wasi_tool.data.text import load_task_data
from wasi_tool.errors import WasiToolError
from wasi_tool.federated.config import FederateConfig
from wasi_tool.federated.partition import PartitionSpec, client_folders, split
from wasi_tool.federated.payload import State, load_state_, trainable_state
from wasi_tool.measure import peak_rss_bytes
from wasi_tool.models.loading import LoadedModel, ModelSource, load_model
from wasi_tool.training.config import FinetuneConfig
from wasi_tool.training.loop import Trainer, evaluate
from wasi_tool.training.prepare import Prepared
from wasi_tool.training.progress import Silent
from wasi_tool.training.session import build_session

ImageSet = Dataset[tuple[torch.Tensor, int]]


@dataclass
class Participant:
    """A prepared model with its data: a client's share of the training set, or the server's
    held-out split (``test``)."""

    loaded: LoadedModel
    transform: Any
    train: ImageSet
    test: ImageSet
    prepared: Prepared
    description: str
    classes: list[str]

    @property
    def model(self) -> torch.nn.Module:
        return self.loaded.model


def client_data(splits: DataSplits, config: FederateConfig, client: int) -> tuple[ImageSet, str]:
    """Client ``client``'s share of ``splits.train`` (iid or dirichlet)."""
    labels = np.asarray(_labels_of(splits.train))
    spec = PartitionSpec.parse(config.partition)
    parts = split(labels, config.clients, spec, config.seed)
    if not 0 <= client < len(parts):
        raise WasiToolError(f"partition id {client} is not in 0..{len(parts) - 1}")
    idx = parts[client].tolist()
    return Subset(
        splits.train, idx
    ), f"client {client}/{config.clients} ({spec}): {len(idx)} samples"


def build(
    source: ModelSource,
    data: str | Path,
    config: FederateConfig,
    client: int | None,
    note: Callable[[str], None] = lambda m: None,
    test_data: str | Path | None = None,
) -> Participant:
    """Load, fit the head and prepare the model as ``finetune`` does (same order, same seed).

    ``client`` None: the server (its test split is ``test_data``'s, else ``data``'s held-out
    split; with the ``folders`` partition, every client folder's held-out split). Otherwise
    client ``client``: with ``folders``, ``data`` is this client's own dataset; else its share.
    """
    local = config.local_config()
    torch.manual_seed(local.seed)
    loaded = load_model(source)
    transform = batch_transform(loaded)

    def load(spec: str | Path) -> DataSplits:
        return load_task_data(
            loaded, spec, transform.size, local.val_fraction, local.seed, local.classes
        )

    folders = PartitionSpec.parse(config.partition).kind == "folders"
    if client is None:
        if test_data is not None:
            splits = load(test_data)
        elif folders:
            parts = [load(p) for p in client_folders(Path(data), config.clients)]
            splits = DataSplits(
                ConcatDataset([p.train for p in parts]),
                ConcatDataset([p.test for p in parts]),
                parts[0].classes,
                f"{len(parts)} client folders in {data}, their held-out splits",
            )
        else:
            splits = load(data)
        train, description = splits.train, splits.description
    elif folders:
        splits = load(data)
        train, description = splits.train, f"client {client}: {splits.description}"
    else:
        splits = load(data)
        train, description = client_data(splits, config, client)
    session = build_session(loaded, (transform, splits), local, train=train, note=note)
    return Participant(
        loaded, transform, train, splits.test, session.prepared, description, list(splits.classes)
    )


def reset_peak_rss() -> bool:
    """Start this process's peak-RSS high-water mark afresh (Linux: ``clear_refs`` 5)."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")
        return True
    return False


@dataclass
class LocalResult:
    state: State
    samples: int
    metrics: dict[str, float]


def train_round(
    part: Participant, state: State, config: FinetuneConfig, keep_dir: Path | None = None
) -> LocalResult:
    """Load the global ``state``, train ``config.epochs`` local epochs on the client's share
    through the finetune Trainer, and return the trained tensors with the local figures
    (loss and accuracy over the local epochs' last one, steps, peak RSS)."""
    model = part.model
    load_state_(model, state)
    reset = reset_peak_rss()
    ckpt = Path(tempfile.mkdtemp(prefix="wasi-fed-")) if keep_dir is None else keep_dir
    try:
        probe = Subset(part.train, list(range(min(len(part.train), config.batch_size))))  # type: ignore[arg-type]
        trainer = Trainer(
            model,
            part.prepared.targets,
            config,
            part.train,
            probe,  # the Trainer evaluates each epoch; one local batch keeps that cheap
            part.transform,
            ckpt,
            Silent(),
            {},
        )
        trainer.train()
    finally:
        if keep_dir is None:
            shutil.rmtree(ckpt, ignore_errors=True)
    last = trainer.history[-1]
    return LocalResult(
        trainable_state(model),
        len(part.train),  # type: ignore[arg-type]
        {
            "train_loss": float(last.train_loss),
            "train_accuracy": float(last.train_accuracy),
            "steps": float(len(trainer.step_times)),
            "seconds": float(sum(r.seconds for r in trainer.history)),
            "peak_rss_bytes": float(peak_rss_bytes()),
            "peak_rss_reset": float(reset),
        },
    )


def evaluate_global(part: Participant, batch_size: int) -> dict[str, float]:
    """Loss and accuracy of the model on the server's test split."""
    out = evaluate(part.model, part.test, part.transform, batch_size)
    part.model.train()
    return out


def subset_labels(ds: ImageSet) -> Sequence[int]:
    return _labels_of(ds)
