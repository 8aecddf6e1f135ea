"""The bare loops bench/harness_overhead.py compares the trainer with: what a PyTorch user
writes for the same model, data and precision, without a DataLoader (the strictest baseline).

Each is a script run as ``python -c SCRIPT PREPARED EPOCHS val|noval DEVICE PRECISION
[BATCH]`` (BATCH: the template's batch size unless given); it
reads the prepared shards, standardizes inputs and targets with the training split's
statistics, puts everything on the device once (a no-op on the CPU), and prints ``RESULT{json}``
with the wall and CPU seconds of its training loop (loading excluded) and the training rows.
``val``: the per-epoch validation loss the harness computes too. PRECISION bf16: the forward
pass and loss under ``torch.autocast(device, bfloat16)``, as the trainer's training.precision.
"""

_COMMON = r'''
import contextlib, json, sys, time
import numpy as np, pyarrow as pa, pyarrow.parquet as pq, torch
from torch import nn
prepare, epochs, validate = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "val"
device = torch.device(sys.argv[4] if len(sys.argv) > 4 else "cpu")
bf16 = len(sys.argv) > 5 and sys.argv[5] == "bf16"
batch_arg = int(sys.argv[6]) if len(sys.argv) > 6 else None
manifest = json.load(open(f"{prepare}/manifest.json"))
def table(name):
    return pa.concat_tables([pq.read_table(f"{prepare}/{s['path']}")
                             for s in manifest["shards"][name]])
def autocast():
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
def run(model, x, y, x_val, y_val, batch):
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    n = len(y)
    t0, c0 = time.perf_counter(), time.process_time()
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(n, generator=g).to(device)
        for i in range(0, n, batch):
            idx = perm[i:i + batch]
            with autocast():
                loss = nn.functional.mse_loss(model(take(x, idx)), y[idx])
            opt.zero_grad(set_to_none=True); loss.backward(); opt.step()
        if validate:  # the per-epoch validation loss that the harness reports too
            model.eval()
            with torch.no_grad(), autocast():
                total = 0.0
                for i in range(0, len(y_val), 4096):
                    part = slice(i, i + 4096)
                    out = model(take(x_val, part))
                    total += nn.functional.mse_loss(out, y_val[part], reduction="sum").item()
                val_loss = total / max(y_val.numel(), 1)
    if device.type == "cuda":
        torch.cuda.synchronize()  # the queued steps are part of the loop's time
    print("RESULT" + json.dumps({"seconds": time.perf_counter() - t0,
                                "cpu_seconds": time.process_time() - c0, "rows": n}))
def standardize(train, val):
    mean, std = train.mean(0), train.std(0).clamp_min(1e-6)
    return (train - mean) / std, (val - mean) / std
'''

BC = _COMMON + r'''
LR = 0.003
def take(x, idx):
    return x[idx]
def split(name):
    t = table(name)
    cols = lambda names: torch.tensor(np.stack([t[c].to_numpy() for c in names], 1),
                                      dtype=torch.float32)
    return cols(manifest["features"]), cols(manifest["targets"])
(x, y), (x_val, y_val) = split("train"), split("val")
x, x_val = standardize(x, x_val)
y, y_val = standardize(y, y_val)
torch.manual_seed(0)
layers, width = [], x.shape[1]
for _ in range(3):
    layers += [nn.Linear(width, 256), nn.ReLU()]; width = 256
model = nn.Sequential(*layers, nn.Linear(width, y.shape[1])).to(device)
run(model, x.to(device), y.to(device), x_val.to(device), y_val.to(device), batch_arg or 256)
'''

# The same network as the trainer's bc_pixels core (its module, so "same model" holds by
# construction): uint8 NHWC frames in, normalized inside; a PyTorch user on a GPU also puts the
# convolutions in channels_last.
BC_PIXELS = _COMMON + r'''
from arf_trainer.trainer.data import read_table_columns
from arf_trainer.trainer.vision_model import PixelNet
LR = 0.001
image = next(c["name"] for c in manifest["columns"]
             if c["name"] in manifest["features"] and len(c.get("shape") or []) == 3)
state_cols = [c for c in manifest["features"] if c != image]
def take(x, idx):
    return {"image": x["image"][idx], "state": x["state"][idx]}
def split(name):
    cols = read_table_columns(table(name), manifest["features"] + manifest["targets"], name)
    state = torch.tensor(np.stack([cols[c] for c in state_cols], 1), dtype=torch.float32)
    act = torch.tensor(np.stack([cols[c] for c in manifest["targets"]], 1), dtype=torch.float32)
    return torch.from_numpy(cols[image]), state, act
(frames, s, y), (frames_val, s_val, y_val) = split("train"), split("val")
s, s_val = standardize(s, s_val)
y, y_val = standardize(y, y_val)
torch.manual_seed(0)
model = PixelNet(s.shape[1], y.shape[1], 256, 2).to(device)
if device.type == "cuda":
    model.encoder.to(memory_format=torch.channels_last)
x = {"image": frames.to(device), "state": s.to(device)}
x_val = {"image": frames_val.to(device), "state": s_val.to(device)}
run(model, x, y.to(device), x_val, y_val.to(device), batch_arg or 64)
'''

SCRIPTS = {"bc": BC, "bc_pixels": BC_PIXELS}
