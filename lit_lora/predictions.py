"""`PredictionWriter`: ``predict`` results as one CSV, whatever the number of processes."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from lit_lora import log
from lit_lora.files import atomic_write


class PredictionWriter(BasePredictionWriter):
    """Writes ``predictions.csv``: ``path,label,score`` and the next best labels with their probabilities.

    One row per image, in the prediction set's order (sorted paths, with the data module). The path column is the
    batch's ``path`` when it carries one, else the data module's name for the row, else the row's number; any
    batch form `LoRAImageClassifier` takes works. Under DDP every process writes its share to a part file and
    process 0 merges them, dropping the duplicates the distributed sampler pads with.
    """

    def __init__(self, output_path: str | None = None, top_k: int = 5) -> None:
        """Say where predictions go.

        Args:
            output_path: CSV file to write; by default ``predictions.csv`` in the run's log folder.
            top_k: how many labels (with probabilities) each row lists.
        """
        super().__init__(write_interval="epoch")
        self.output_path = output_path
        self.top_k = top_k

    def resolve_path(self, trainer: pl.Trainer) -> Path:
        """Where the CSV is written."""
        if self.output_path:
            return Path(self.output_path)
        return Path(trainer.log_dir or ".") / "predictions.csv"

    def write_on_epoch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, predictions: Any, batch_indices: Any
    ) -> None:
        path = self.resolve_path(trainer)
        if trainer.is_global_zero:
            path.parent.mkdir(parents=True, exist_ok=True)
        trainer.strategy.barrier()
        part = path.with_name(f".{path.name}.rank{trainer.global_rank}.pt")
        batches = predictions[0] if predictions and isinstance(predictions[0], list) else predictions
        indices = batch_indices[0] if batch_indices and isinstance(batch_indices[0], list) else batch_indices
        rows: dict[str, list] = {"index": [], "probs": [], "path": []}
        for n, batch in enumerate(batches):
            if batch is None:  # every image of the batch was unreadable
                continue
            count = len(batch["probs"])
            if "index" in batch:
                index = [int(i) for i in batch["index"]]
            elif indices and n < len(indices) and indices[n] is not None and len(indices[n]) == count:
                index = [int(i) for i in indices[n]]  # the sampler's dataset indices (Lightning tracks them)
            else:
                index = list(range(len(rows["index"]), len(rows["index"]) + count))
            rows["index"] += index
            rows["probs"] += list(batch["probs"].float().cpu())
            rows["path"] += [str(p) for p in batch["path"]] if "path" in batch else [None] * count
        torch.save(rows, part)
        trainer.strategy.barrier()
        if trainer.is_global_zero:
            parts = [path.with_name(f".{path.name}.rank{r}.pt") for r in range(trainer.world_size)]
            self._merge(trainer, pl_module, parts, path)
        trainer.strategy.barrier()

    def _merge(self, trainer: pl.Trainer, pl_module: pl.LightningModule, parts: list[Path], path: Path) -> None:
        rows: dict[int, tuple[torch.Tensor, str | None]] = {}
        for part in parts:
            chunk = torch.load(part, weights_only=True)
            for index, probs, where in zip(chunk["index"], chunk["probs"], chunk["path"]):
                rows[int(index)] = (probs, where)  # padded duplicates carry the same image: keep one
            part.unlink()
        table = getattr(trainer.datamodule, "predict_table", None) if trainer.datamodule is not None else None
        names = pl_module.class_names
        k = min(self.top_k, len(names))
        header = ["path", "label", "score"] + [f"{col}_{i}" for i in range(2, k + 1) for col in ("label", "score")]

        def write(f: Any) -> None:
            writer = csv.writer(f)
            writer.writerow(header)
            for index in sorted(rows):
                probs, where = rows[index]
                scores, ids = probs.float().topk(k)
                cells = [where or (table.describe(index) if table is not None else str(index))]
                for score, label in zip(scores.tolist(), ids.tolist()):
                    cells += [names[label], f"{score:.6f}"]
                writer.writerow(cells)

        atomic_write(path, write)
        log.info(f"[lit_lora] wrote {len(rows)} predictions to {path}")
