"""The ``fliqs`` command.

    fliqs formats [--json]
    fliqs methods [--json]
    fliqs cost [--model NAME] [--format F | --assignment FILE.json] [--input-size N] [--num-classes K] [--json]
               [key=value ...]
    fliqs search [key=value ...]
    fliqs study [key=value ...]
    fliqs evaluate RUN [--split test|val] [--json] [key=value ...]
    fliqs export RUN --to DIR [--onnx] [--onnx-float4 emulate|qdq] [--json] [key=value ...]
    fliqs pareto --experiment NAME [--tracking-uri URI] [--parent RUN_ID] [--json]

``cost``, ``search`` and ``study`` take config overrides (``key=value``, see `fliqs.run.config`); the flags of ``cost``
are shorthands for ``model.name``, ``model.input_size`` and ``model.num_classes``. Bad input (unknown key, format,
model, data path, ...) exits with status 2 and one line on stderr, before any work starts.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys

from fliqs.errors import BadInput
from fliqs.quant.formats import FORMATS, get_format
from fliqs.run.console import table
from fliqs.run.signals import received, stop_on_signals

EXIT_BAD_INPUT = 2


class UsageError(BadInput):
    """Bad input found by a command itself (not by the config layer)."""


STORE_KEYS = {"output_dir", "tracking.uri", "tracking.experiment"}  # the overrides that say where a store is


def cmd_formats(args: argparse.Namespace) -> int:
    rows = [f.describe() for f in FORMATS.values()]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    cols = ["name", "kind", "bits", "exp_bits", "man_bits", "bias", "max_value", "min_normal", "min_subnormal",
            "overflow", "reference_overflow", "block_size", "scale_format", "effective_bits"]
    print(table([[_fmt(r[c]) if r[c] is not None else "" for c in cols] for r in rows], cols))
    print("\nLimits are the element format's. A block-scaled format shares one scale per block of consecutive values "
          "along the reduction axis; effective_bits (element bits + scale bits / block size) is what the cost "
          "model counts.")
    return 0


def _fmt(v) -> str:
    return f"{v:.6g}" if isinstance(v, float) else str(v)


def cmd_methods(args: argparse.Namespace) -> int:
    from fliqs.searchers.methods import METHODS

    rows = [{"name": m.name, "family": m.family, "summary": m.summary, "supernet": m.supernet}
            for m in METHODS.values()]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(table([[r["name"], r["family"], "yes" if r["supernet"] else "", r["summary"]] for r in rows],
                ["method", "family", "supernet", "what it does"]))
    return 0


def _load_assignment(path: str) -> tuple[dict, dict | None]:
    """({layer: format}, the model a result.json names, or None) from an assignment file or a result."""
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise UsageError(f"--assignment: no such file {path!r}") from None
    except json.JSONDecodeError as err:
        raise UsageError(f"--assignment {path!r}: not valid JSON ({err})") from None
    model = data.get("model") if isinstance(data, dict) and isinstance(data.get("model"), dict) else None
    data = data.get("assignment", data) if isinstance(data, dict) else data
    if not isinstance(data, dict):
        raise UsageError(f"--assignment {path!r}: expected an object {{layer: format}}")
    return data, model


def cmd_cost(args: argparse.Namespace) -> int:
    from fliqs.models.registry import check_model_name, create_model, default_input_size, input_channels
    from fliqs.models.supernet import extract, is_supernet
    from fliqs.quant.cost import model_cost
    from fliqs.run.loading import load_config

    if args.format and args.assignment:
        raise UsageError("give --format or --assignment, not both")
    assignment, model = _load_assignment(args.assignment) if args.assignment else (None, None)
    if model and args.model and args.model != model["name"]:
        raise UsageError(f"--assignment {args.assignment!r} is a result of model {model['name']!r}; leave --model "
                         f"out (or give {model['name']})")
    overrides = list(args.overrides)
    if model:  # a result.json names its model and input size
        overrides[:0] = [f"model.name={model['name']}", f"model.input_size={model['input_size']}",
                         f"model.num_classes={model['num_classes']}",
                         *(f"model.kwargs.{k}={json.dumps(v)}" for k, v in model.get("kwargs", {}).items())]
    for flag, key in ((args.model, "model.name"), (args.input_size, "model.input_size"),
                      (args.num_classes, "model.num_classes")):
        if flag is not None:
            overrides.append(f"{key}={flag}")
    cfg = load_config(overrides)
    fmt = get_format(args.format).name if args.format else None
    check_model_name(cfg.model.name)
    model = create_model(cfg.model.name, num_classes=cfg.model.num_classes, **cfg.model.kwargs)
    if is_supernet(model):  # its architecture (model.kwargs.arch, else MobileNetV2's), without unused weights
        model = extract(model)
    size = cfg.model.input_size or default_input_size(model)
    summary = model_cost(model, size, input_channels(model), assignment, default=fmt or "fp32")
    if args.json:
        print(json.dumps({"model": cfg.model.name, "input_size": size, **summary.to_dict()}, indent=2))
        return 0
    rows = [[c.name, c.kind, f"{c.macs:,}", c.w_format, c.a_format, f"{c.bops / 1e9:.4f}"] for c in summary.layers]
    print(table(rows, ["layer", "kind", "macs", "w", "a", "gbops"], right=["macs", "gbops"]))
    print(f"\n{cfg.model.name} at {size}px: {summary.gmacs:.4f} GMACs, {summary.gbops:.4f} GBOPs, "
          f"{summary.size_mb:.4f} MB")
    return 0


def _load_checked(overrides: list[str], study: bool = False):
    """The configuration (loaded once, without torch), and the tracking server reached, before the slow imports
    (torch, Ray, MLflow)."""
    from fliqs.run.loading import load_config
    from fliqs.run.tracking import check_server

    cfg = load_config(overrides, study=study)
    if cfg.tracking.uri:
        check_server(cfg.tracking.uri)
    return cfg


def cmd_search(args: argparse.Namespace) -> int:
    cfg = _load_checked(args.overrides)
    from fliqs.trainables.search import print_summary, run_search

    print_summary(run_search(cfg))
    return 0


def cmd_study(args: argparse.Namespace) -> int:
    cfg = _load_checked(args.overrides, study=True)
    from fliqs.trainables.study import print_study, run_study

    summary = run_study(cfg)
    print_study(summary)
    return 1 if summary["errors"] else 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from fliqs.run.inputs import check_run_ref
    from fliqs.run.loading import load_config

    check_run_ref(args.run)
    from fliqs.run.tracking import check_store, tracking_uri

    cfg = load_config(args.overrides)  # output_dir / tracking.uri / tracking.experiment find the run
    uri = tracking_uri(cfg.tracking.uri, cfg.output_dir)
    from fliqs.trainables.saved import evaluate_run

    check_store(uri)
    result = evaluate_run(uri, cfg.tracking.experiment, args.run, args.split)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    reported = f" (reported {result['reported']:.4f})" if result["reported"] is not None else ""
    print(f"run {result['run_id']}: {args.split} accuracy {result['accuracy']:.4f} on {result['samples']} samples"
          f"{reported}, rebuilt in this process from {result['model_run_id']}'s model.pt")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from fliqs.run.inputs import check_run_ref
    from fliqs.run.loading import load_config

    check_run_ref(args.run)
    from fliqs.run.tracking import check_store, tracking_uri

    cfg = load_config(args.overrides)  # output_dir / tracking.uri / tracking.experiment find the run
    uri = tracking_uri(cfg.tracking.uri, cfg.output_dir)
    check_store(uri)
    from fliqs.export.pytorch import MODEL_PY, ONNX_FILE, SPEC_FILE, WEIGHTS_FILE
    from fliqs.trainables.saved import export_run

    spec = export_run(uri, cfg.tracking.experiment, args.run, args.to, onnx=args.onnx, float4=args.onnx_float4)
    if args.json:
        print(json.dumps(spec, indent=2))
        return 0
    files = [MODEL_PY, WEIGHTS_FILE, SPEC_FILE] + ([ONNX_FILE] if args.onnx else [])
    accuracy = spec["metrics"].get("test_accuracy")
    print(f"run {spec['run_id']}: {spec['model']['name']} with {len(spec['layers'])} quantized layers"
          + (f" (test accuracy {accuracy:.4f})" if accuracy is not None else "") + f" exported to {args.to}: "
          + ", ".join(files))
    if args.onnx:
        rows = [[name, layer["w"], layer["a"]] for name, layer in spec["onnx"]["layers"].items()]
        print(f"\nONNX opset {spec['onnx']['opset']}, per quantized layer:\n"
              + table(rows, ["layer", "weight", "activation"]))
    print(f"\nplain PyTorch: model.py's load() (no fliqs needed); in fliqs: "
          f"fliqs.export.pytorch.load_export({args.to!r})")
    return 0


def cmd_pareto(args: argparse.Namespace) -> int:
    from fliqs.analysis.budgets import budget_report, budget_tables
    from fliqs.analysis.fronts import describe_reference, study_report
    from fliqs.analysis.store import collect_points
    from fliqs.run.inputs import check_run_id, check_tracking_uri
    from fliqs.run.loading import load_config
    from fliqs.run.tracking import tracking_uri

    # The store as evaluate and export find it (output_dir= / tracking.uri= / tracking.experiment=); the older
    # --tracking-uri and --experiment flags, and $MLFLOW_TRACKING_URI, still work.
    cfg = load_config(args.overrides)
    given = {o.partition("=")[0] for o in args.overrides}
    uri = args.tracking_uri or (tracking_uri(cfg.tracking.uri, cfg.output_dir) if given & STORE_KEYS else None) \
        or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise UsageError("give output_dir=DIR or tracking.uri=URI (or --tracking-uri, or set MLFLOW_TRACKING_URI)")
    check_tracking_uri(uri)
    check_run_id("--parent", args.parent)
    experiment = args.experiment or cfg.tracking.experiment
    points = collect_points(uri, experiment, args.parent)
    if not points:
        where = f"children of run {args.parent}" if args.parent else f"experiment {experiment!r}"
        raise UsageError(f"no trials with test_accuracy, gbops and a method tag among the {where}")
    report = study_report(points)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    counts = {m: sum(p.method == m for p in points) for m in report}
    for method, entry in report.items():
        front = entry["front"]
        print(f"{method} ({front[0]['family'] or '-'}): hypervolume {entry['hypervolume']:.6g}, "
              f"{len(front)} of {counts[method]} trials on the front")
        rows = [[p["method"], f"{p['accuracy']:.4f}", f"{p['gbops']:.6g}", p["run_id"]] for p in front]
        print(table(rows, ["method", "accuracy", "gbops", "run_id"]) + "\n")
    print(budget_tables(budget_report(points)) + "\n")
    print(f"hypervolume reference: {describe_reference(points)}")
    return 0


class _OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (exit status 2), like every other bad input."""

    def error(self, message: str):
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(prog="fliqs", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("formats", help="list the numeric formats and their limits")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_formats)

    p = sub.add_parser("methods", help="list the search methods and their families")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_methods)

    p = sub.add_parser("cost", help="MACs, BOPs and size of a model under a format or an assignment")
    p.add_argument("--model")
    p.add_argument("--format", help="one format for every layer (default fp32)")
    p.add_argument("--assignment", help="JSON file {layer: format | {w:, a:}} (a result.json works too)")
    p.add_argument("--input-size", type=int)
    p.add_argument("--num-classes", type=int)
    p.add_argument("--json", action="store_true")
    p.add_argument("overrides", nargs="*", help="config overrides key=value")
    p.set_defaults(func=cmd_cost)

    p = sub.add_parser("search", help="one run of a search method (default FLIQS) on Ray Train, recorded in MLflow")
    p.add_argument("overrides", nargs="*", help="config overrides key=value")
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("study", help="FLIQS against uniform, multi-trial and differentiable searches (Ray Tune)")
    p.add_argument("overrides", nargs="*", help="config overrides key=value (study=digits, study.methods=[...])")
    p.set_defaults(func=cmd_study)

    p = sub.add_parser("evaluate", help="rebuild a run's saved model in this process and measure its accuracy")
    p.add_argument("run", help="run name (of tracking.experiment) or MLflow run id")
    p.add_argument("--split", choices=["test", "val"], default="test")
    p.add_argument("--json", action="store_true")
    p.add_argument("overrides", nargs="*", help="output_dir=..., tracking.uri=..., tracking.experiment=...")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("export", help="write a run's model as a standalone PyTorch folder (and ONNX with --onnx)")
    p.add_argument("run", help="run name (of tracking.experiment) or MLflow run id")
    p.add_argument("--to", required=True, help="the folder to write (created; its export files are replaced)")
    p.add_argument("--onnx", action="store_true", help="also write model.onnx (QuantizeLinear/DequantizeLinear)")
    p.add_argument("--onnx-float4", choices=["emulate", "qdq"], default="emulate",
                   help="fp4_e2m1 in ONNX: emulated rounding (default; onnxruntime has no float4 kernel) or "
                        "float4e2m1 Q/DQ (opset 23)")
    p.add_argument("--json", action="store_true")
    p.add_argument("overrides", nargs="*", help="output_dir=..., tracking.uri=..., tracking.experiment=...")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("pareto", help="per-method Pareto fronts (accuracy against GBOPs) and hypervolumes of a study")
    p.add_argument("--experiment", help="MLflow experiment name (as tracking.experiment=; default: fliqs' own)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (as tracking.uri=; default: $MLFLOW_TRACKING_URI)")
    p.add_argument("--parent", help="only the child runs of this (study) run id")
    p.add_argument("--json", action="store_true")
    p.add_argument("overrides", nargs="*", help="where the store is: output_dir=DIR or tracking.uri=URI "
                                                "[tracking.experiment=NAME]")
    p.set_defaults(func=cmd_pareto)
    return parser


def run(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)  # argparse itself exits 2 on bad flags
    try:
        with stop_on_signals():
            return args.func(args)
    except BadInput as err:
        print(f"fliqs {args.command}: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt as err:  # SIGINT or SIGTERM (`fliqs.run.signals`); Ray re-raises a plain one
        from fliqs.trainables.cluster import stop_ray

        stop_ray()  # the workers of a local instance go with it; a cluster's job actors are owned by this driver
        resume = getattr(err, "resume", None)
        print(f"fliqs {args.command}: stopped by {signal.Signals(received()).name}"
              + (f": {resume}" if resume else " before any run was created"), file=sys.stderr)
        return 128 + received()


def main(argv: list[str] | None = None) -> None:
    # No network here: MLflow's telemetry would hold every process for seconds at exit.
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no progress bars on stderr
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # no "Creating initial MLflow database tables..."
    sys.exit(run(argv))


if __name__ == "__main__":
    main()
