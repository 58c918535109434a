"""A run's saved model: rebuilt in one process from its ``model.pt`` artifact, evaluated (`fliqs evaluate`).

``model.pt`` is what the training loop evaluated and reported (`fliqs.trainables.loop`): the resolved config, the
state dict (BatchNorm statistics and calibrated ranges included), the final assignment and the reported metrics.
It is a ``torch.save`` of plain data and tensors, loaded with ``weights_only=True``. A run that trained several
networks (a multi-trial search, the sequential baseline) names the run holding its result in the tag
`fliqs.run.schema.MODEL_RUN`.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from fliqs.data.datasets import DataInfo, describe, load_configured
from fliqs.data.preprocessing import preprocessing
from fliqs.errors import BadInput
from fliqs.quant.layers import set_assignment
from fliqs.run import schema
from fliqs.run.config import FliqsConfig, derive, from_dict
from fliqs.run.inputs import RUN_ID
from fliqs.run.tracking import client, find_run
from fliqs.trainables.checkpoints import MODEL_FORMAT
from fliqs.trainables.plan import Network, build_network
from fliqs.training.evaluation import split_accuracy


@dataclass
class SavedModel:
    cfg: FliqsConfig  # the run's config (a FLIQNAS result: model.kwargs.arch set to its architecture)
    info: DataInfo
    network: Network  # the model at its final formats and saved state, on the CPU
    saved: dict  # the model.pt content: assignment, decisions, metrics


def load_model(path: str | Path) -> SavedModel:
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unreadable: not a saved fliqs model
        raise BadInput(f"{path} is not a fliqs model: {(str(err).strip().splitlines() or [type(err).__name__])[0]}") \
            from None
    if not isinstance(saved, dict) or saved.get("format") != MODEL_FORMAT:
        raise BadInput(f"{path} is not a {MODEL_FORMAT} file")
    cfg = from_dict(saved["config"])
    architecture = saved["metrics"].get("architecture")
    if architecture:  # the extracted network of a joint search: the supernet at that architecture, made plain
        cfg = derive(cfg, {"model.kwargs": {"arch": architecture}})
    info = describe(cfg.data.name, cfg.data.path, cfg.model.input_size)
    network = build_network(cfg, info, search_arch=False)
    set_assignment(network.layers, saved["assignment"])
    network.model.load_state_dict(saved["model"])
    return SavedModel(cfg, info, network, saved)


def resolve_run(uri: str, experiment: str, run: str):
    """The MLflow run named ``run`` (a run name of the experiment, or a run id), and the run holding its model."""
    c = client(uri)
    if RUN_ID.match(run):
        found = c.get_run(run)
    else:
        exp = c.get_experiment_by_name(experiment)
        run_id = find_run(uri, exp.experiment_id, run) if exp is not None else None
        if run_id is None:
            raise BadInput(f"no run named {run!r} in experiment {experiment!r} of {uri}")
        found = c.get_run(run_id)
    model_run = found.data.tags.get(schema.MODEL_RUN, found.info.run_id)
    return found, (found if model_run == found.info.run_id else c.get_run(model_run))


def fetch_model(uri: str, experiment: str, run: str):
    """(the run, the run holding its model, the rebuilt `SavedModel`) for ``run`` (a name or a run id)."""
    found, holder = resolve_run(uri, experiment, run)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = client(uri).download_artifacts(holder.info.run_id, schema.MODEL_FILE, tmp)
        except Exception:  # MLflow raises several types for a missing artifact
            raise BadInput(f"run {found.info.run_id} has no {schema.MODEL_FILE} (not finished, or older than "
                           f"{MODEL_FORMAT})") from None
        return found, holder, load_model(path)


def evaluate_run(uri: str, experiment: str, run: str, split: str = "test", batch_size: int | None = None) -> dict:
    """Rebuild ``run``'s saved model in this process and measure its accuracy on ``split``."""
    found, holder, model = fetch_model(uri, experiment, run)
    cfg = model.cfg
    splits = load_configured(cfg.data, cfg.model.input_size)
    data = {"test": splits.test, "val": splits.val}[split]
    accuracy = split_accuracy(model.network.model, data, batch_size or cfg.data.batch_size)
    reported = model.saved["metrics"].get(f"{split}_accuracy" if split == "test" else schema.VALIDATION_ACCURACY)
    return {"run_id": found.info.run_id, "model_run_id": holder.info.run_id, "split": split, "samples": len(data),
            "accuracy": accuracy, "reported": reported, "assignment": model.saved["assignment"],
            "architecture": model.saved["metrics"].get("architecture")}


def export_run(uri: str, experiment: str, run: str, out: str | Path, onnx: bool = False,
               float4: str = "emulate") -> dict:
    """Write ``run``'s saved model as a standalone folder (`fliqs.export.pytorch`); returns its assignment.json
    content."""
    from fliqs.export.pytorch import export_model

    found, holder, model = fetch_model(uri, experiment, run)
    cfg, info = model.cfg, model.info
    metrics = {k: v for k, v in model.saved["metrics"].items() if isinstance(v, int | float | str)}
    metadata = {"run_id": found.info.run_id, "model_run_id": holder.info.run_id, "tracking_uri": uri,
                "model": {"name": cfg.model.name, "kwargs": dict(cfg.model.kwargs),
                          "num_classes": info.num_classes},
                "data": {"name": cfg.data.name, "batch_size": cfg.data.batch_size},
                "metrics": metrics}
    steps = preprocessing(cfg.data.name, cfg.data.path, cfg.model.input_size, cfg.data.val_fraction,
                          cfg.data.test_fraction, cfg.data.seed, cfg.data.train_subset)
    return export_model(model.network.model, out, title=f"{cfg.model.name} of MLflow run {holder.info.run_id}",
                        input_shape=(info.in_chans, info.input_size, info.input_size), metadata=metadata,
                        batch_size=cfg.data.batch_size, onnx=onnx, float4=float4, preprocessing=steps.describe())
