"""A training command that is not PyTorch: scikit-learn logistic regression on the prepared data.

It uses only the step contract, not arf_trainer (any image with Python, scikit-learn, pyarrow
and joblib can run it):

- reads the job spec at $ARF_JOB_SPEC (hyperparameters, seed) and the prepared shards listed in
  $ARF_DATA_DIR/manifest.json;
- writes the model to $ARF_OUTPUT_DIR (any files: the register step logs and registers the
  folder as it is);
- writes its result to $ARF_RESULT_PATH, last, with the metrics it wants recorded.
"""

import hashlib
import json
import os
from pathlib import Path

import joblib
import numpy as np
import pyarrow.parquet as pq
from sklearn.linear_model import LogisticRegression


def load(data_dir: Path, manifest: dict, split: str) -> tuple[np.ndarray, np.ndarray]:
    shards = [pq.read_table(data_dir / s["path"]) for s in manifest["shards"][split]]
    x = np.concatenate([np.stack([t[c].to_numpy() for c in manifest["features"]], 1) for t in shards])
    y = np.concatenate([t[manifest["targets"][0]].to_numpy() for t in shards])
    return x, y


def main() -> None:
    spec = json.loads(Path(os.environ["ARF_JOB_SPEC"]).read_text())
    data_dir = Path(os.environ["ARF_DATA_DIR"])
    manifest = json.loads((data_dir / "manifest.json").read_text())
    x_train, y_train = load(data_dir, manifest, "train")
    x_val, y_val = load(data_dir, manifest, "val")
    hp = spec["hyperparameters"]
    model = LogisticRegression(C=hp.get("c", 1.0), max_iter=hp.get("max_iter", 200),
                               random_state=spec["seed"])
    model.fit(x_train, y_train)
    out = Path(os.environ["ARF_OUTPUT_DIR"])
    out.mkdir(parents=True, exist_ok=True)
    joblib.dump(model, out / "model.joblib")
    (out / "features.json").write_text(json.dumps(manifest["features"]))
    metrics = {"train_accuracy": float(model.score(x_train, y_train)),
               "val_accuracy": float(model.score(x_val, y_val))}
    print(f"sklearn logistic regression: val_accuracy {metrics['val_accuracy']:.4f}", flush=True)
    result = {"metrics": metrics, "framework": "scikit-learn",
              "model_sha256": hashlib.sha256((out / "model.joblib").read_bytes()).hexdigest()}
    path = Path(os.environ["ARF_RESULT_PATH"])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result))
    os.replace(tmp, path)


if __name__ == "__main__":
    main()
