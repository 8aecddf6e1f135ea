"""A PyTorch Lightning training script run as a template's own command (digits_lightning.yaml).

Written the way a Lightning user writes one: a LightningModule, a DataModule, a Trainer with
`strategy="ddp"`, `MLFlowLogger` and `ModelCheckpoint`. It does not import arf_trainer. The
lines marked `# arf glue` are all the step contract asks for (README, "Your own training
command"):

- MLflow: `MLFlowLogger(run_id=$MLFLOW_RUN_ID)` logs live into the DAG run's MLflow run (the
  backend's launch wrapper sets it for global rank 0 only; Lightning logs from rank 0 anyway);
- processes: torchrun (local backend) or a PyTorchJob starts one process per rank, so the
  Trainer takes its shape from LOCAL_WORLD_SIZE / WORLD_SIZE instead of spawning its own;
- resume: checkpoints go to $ARF_CHECKPOINT_DIR, which survives preemptions and retries of the
  DAG run; on SIGTERM every rank stops after the same batch (`StopOnSigterm`), saves, and the
  script exits 75 ("preempted, resume me"); a start resumes from the newest checkpoint there;
- output: the weights into $ARF_OUTPUT_DIR and, last, the result JSON at $ARF_RESULT_PATH.
"""

import json
import os
import signal
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pyarrow.parquet as pq
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import MLFlowLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

PREEMPTED = 75  # arf glue: "preempted, resume me"


class DigitsClassifier(L.LightningModule):
    def __init__(self, n_features: int, hidden_size: int, lr: float) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(n_features, hidden_size), nn.ReLU(),
                                 nn.Linear(hidden_size, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.log("val_loss", nn.functional.cross_entropy(logits, y), sync_dist=True)
        self.log("val_accuracy", (logits.argmax(1) == y).float().mean(), sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


class StopOnSigterm(L.Callback):
    """SIGTERM -> every rank stops after the same batch, saves a checkpoint, fit returns.

    Lightning 2.6's own SIGTERM handler runs a collective (a broadcast) inside the signal
    handler; when every rank is signalled at once (torchrun passes SIGTERM to all of them) the
    ranks meet in different collectives and DDP on gloo deadlocks. This handler only records
    the signal; the ranks agree on it with one all_reduce per batch, outside any handler.
    """

    def __init__(self, checkpoint: Path) -> None:
        self.checkpoint, self.requested, self.stopped = checkpoint, False, False

    def on_train_start(self, trainer, pl_module):
        # After Lightning installed its own handler (in fit), which this one replaces.
        signal.signal(signal.SIGTERM, lambda *_: setattr(self, "requested", True))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        flag = torch.tensor([1.0 if self.requested else 0.0])
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        if flag.item() and not self.stopped:
            trainer.save_checkpoint(self.checkpoint)  # every rank takes part
            self.stopped = trainer.should_stop = True


class DigitsData(L.LightningDataModule):
    """The prepared shards of the train and val splits (listed in the data manifest)."""

    def __init__(self, data_dir: Path, batch_size: int) -> None:
        super().__init__()
        self.data_dir, self.batch_size = data_dir, batch_size
        self.manifest = json.loads((data_dir / "manifest.json").read_text())

    def _split(self, split: str) -> TensorDataset:
        tables = [pq.read_table(self.data_dir / s["path"]) for s in self.manifest["shards"][split]]
        x = np.concatenate([np.stack([t[c].to_numpy() for c in self.manifest["features"]], 1)
                            for t in tables]).astype(np.float32) / 16.0
        y = np.concatenate([t[self.manifest["targets"][0]].to_numpy() for t in tables])
        return TensorDataset(torch.from_numpy(x), torch.from_numpy(y.astype(np.int64)))

    def train_dataloader(self):
        return DataLoader(self._split("train"), batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self):
        return DataLoader(self._split("val"), batch_size=256)


def main() -> int:
    spec = json.loads(Path(os.environ["ARF_JOB_SPEC"]).read_text())  # arf glue
    hp = spec["hyperparameters"]
    L.seed_everything(spec["seed"], workers=True)
    data = DigitsData(Path(os.environ["ARF_DATA_DIR"]), hp["batch_size"])  # arf glue
    model = DigitsClassifier(len(data.manifest["features"]), hp["hidden_size"], hp["lr"])
    checkpoints = Path(os.environ["ARF_CHECKPOINT_DIR"])  # arf glue
    preemption = StopOnSigterm(checkpoints / "preempted.ckpt")  # arf glue
    local_procs = int(os.environ.get("LOCAL_WORLD_SIZE", 1))  # arf glue (torchrun's shape)
    trainer = L.Trainer(
        max_epochs=hp["epochs"], accelerator="cpu", strategy="ddp", deterministic=True,
        devices=local_procs, num_nodes=int(os.environ.get("WORLD_SIZE", 1)) // local_procs,
        logger=MLFlowLogger(run_id=os.environ.get("MLFLOW_RUN_ID"),  # arf glue
                            tracking_uri=os.environ.get("MLFLOW_TRACKING_URI")),
        callbacks=[ModelCheckpoint(dirpath=checkpoints, save_last=True,
                                   every_n_train_steps=hp["checkpoint_every_steps"]),
                   preemption],
        log_every_n_steps=5, enable_progress_bar=False, enable_model_summary=False)
    newest = sorted(checkpoints.glob("*.ckpt"), key=lambda p: p.stat().st_mtime)
    if newest:
        print(f"resuming from {newest[-1]}", flush=True)
    trainer.fit(model, datamodule=data, ckpt_path=str(newest[-1]) if newest else None)
    if preemption.stopped:
        print("SIGTERM: checkpoint saved, exiting to be resumed", flush=True)
        # arf glue: exit at once. torchrun is shutting down too (it passed the SIGTERM on) and
        # its rendezvous store may be gone, which hangs the interpreter's DDP teardown.
        os._exit(PREEMPTED)
    if trainer.is_global_zero:
        out = Path(os.environ["ARF_OUTPUT_DIR"])  # arf glue
        out.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), out / "model.pt")
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        result = Path(os.environ["ARF_RESULT_PATH"])  # arf glue: written last
        result.parent.mkdir(parents=True, exist_ok=True)
        result.write_text(json.dumps({"metrics": metrics, "framework": "lightning",
                                      "epochs": trainer.current_epoch}))
        print(f"lightning: val_accuracy {metrics.get('val_accuracy', float('nan')):.4f}",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
