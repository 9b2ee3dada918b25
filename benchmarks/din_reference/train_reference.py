"""Trains DeepCTR-Torch's DIN on the arrays bench_din_reference.py wrote; runs in the reference's own environment.

    python train_reference.py FOLDER     # reads FOLDER/{fit,valid,test}.npz and settings.json,
                                         # writes FOLDER/test_scores.npy and result.json

The epoch with the best validation AUC is kept (patience 1, as our DIN in the benchmark), then the test rows are
scored once.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import numpy as np
import torch
from deepctr_torch.inputs import DenseFeat, SparseFeat, VarLenSparseFeat
from deepctr_torch.models import DIN
from sklearn.metrics import roc_auc_score


def inputs(arrays: dict[str, np.ndarray], sparse: list[str], item: str, category: str) -> dict[str, np.ndarray]:
    x = {name: arrays[f"sparse__{name}"] for name in sparse}
    x["dense"] = arrays["dense"]
    x[f"hist_{item}"] = arrays["hist__hist_item_ids"]
    x[f"hist_{category}"] = arrays["hist__hist_categories"]
    x["seq_length"] = (arrays["hist__hist_item_ids"] > 0).sum(axis=1)
    return x


def main() -> None:
    folder = Path(sys.argv[1])
    settings = json.loads((folder / "settings.json").read_text())
    torch.manual_seed(settings["seed"])
    torch.set_num_threads(settings["threads"])
    parts = {name: dict(np.load(folder / f"{name}.npz")) for name in ("fit", "valid", "test")}
    sparse = [key.removeprefix("sparse__") for key in parts["fit"] if key.startswith("sparse__")]
    item, category = settings["item"].removeprefix("sparse__"), settings["category"].removeprefix("sparse__")
    dim, sizes, maxlen = settings["dim"], settings["sizes"], parts["fit"]["hist__hist_item_ids"].shape[1]
    columns = [SparseFeat(name, vocabulary_size=sizes[f"sparse__{name}"], embedding_dim=dim) for name in sparse]
    columns.append(DenseFeat("dense", parts["fit"]["dense"].shape[1]))
    # history items and categories share the target item's and category's tables (embedding_name)
    columns.append(VarLenSparseFeat(SparseFeat(f"hist_{item}", vocabulary_size=sizes[f"sparse__{item}"], embedding_dim=dim,
                                               embedding_name=item), maxlen=maxlen, length_name="seq_length"))
    columns.append(VarLenSparseFeat(SparseFeat(f"hist_{category}", vocabulary_size=sizes[f"sparse__{category}"], embedding_dim=dim,
                                               embedding_name=category), maxlen=maxlen, length_name="seq_length"))
    model = DIN(columns, [item, category], device="cpu", seed=settings["seed"])
    model.compile("adam", "binary_crossentropy")
    x = {name: inputs(arrays, sparse, item, category) for name, arrays in parts.items()}
    best_auc, best_epoch, best_state, waited = -1.0, 0, None, 0
    for epoch in range(1, settings["epochs"] + 1):
        model.fit(x["fit"], parts["fit"]["label"], batch_size=settings["batch_size"], epochs=1, verbose=0, shuffle=True)
        auc = roc_auc_score(parts["valid"]["label"], model.predict(x["valid"], batch_size=8192).reshape(-1))
        print(f"reference epoch {epoch}: valid AUC {auc:.4f}", flush=True)
        if auc > best_auc:
            best_auc, best_epoch, best_state, waited = auc, epoch, copy.deepcopy(model.state_dict()), 0
        else:
            waited += 1
            if waited > 1:
                break
    model.load_state_dict(best_state)
    np.save(folder / "test_scores.npy", model.predict(x["test"], batch_size=8192).reshape(-1).astype(np.float64))
    (folder / "result.json").write_text(json.dumps({"best_epoch": best_epoch, "valid_auc": best_auc}))


if __name__ == "__main__":
    main()
