"""Run ``fliqs search`` / ``fliqs study`` on the head node of a running Ray cluster.

    ray submit clusters/aws.yaml clusters/submit_entry.py -- search name=s1 train.num_workers=2 train.use_gpu=true
    ray submit clusters/aws.yaml clusters/submit_entry.py -- study study=digits

`ray submit` copies only this file to the head (``~/submit_entry.py``) and runs it there with the head's Python:
fliqs itself must already be installed on every node (the cluster YAML's file_mounts + setup_commands, or the
image on KubeRay). It joins the arguments with spaces for the remote shell, so quote values that contain spaces
or shell characters twice: ``"'quant.pinned={features.0: int8}'"``. Add ``--tmux`` to ``ray submit`` to keep a
long search running when your SSH connection drops.

For ``search`` and ``study`` these overrides are added unless already given:

    ray_address=auto                attach to the running cluster
    tracking.uri=URI                $FLIQS_TRACKING_URI, else http://<this node's private IP>:5000, the MLflow
                                    server the cluster YAML starts on the head
    output_dir=/mnt/shared/fliqs    shared storage: Ray Train storage and checkpoints go to <output_dir>/ray

Any other command (``formats``, ``cost``, ``pareto``) is passed to fliqs unchanged.

Alternative without this script, through the dashboard port that ``ray dashboard clusters/aws.yaml`` forwards
(the job's driver runs on the head; fliqs still comes from the nodes' installation, --working-dir only ships
files such as configs):

    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        fliqs search ray_address=auto tracking.uri=http://<head-private-ip>:5000 output_dir=/mnt/shared/fliqs ...
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence

CLUSTER_COMMANDS = ("search", "study")
DEFAULT_OUTPUT_DIR = "/mnt/shared/fliqs"
MLFLOW_PORT = 5000
TRACKING_URI_ENV = "FLIQS_TRACKING_URI"


def override_keys(args: Sequence[str]) -> set[str]:
    """The keys of the ``key=value`` overrides among ``args``."""
    return {a.partition("=")[0].strip() for a in args if "=" in a}


def build_argv(argv: Sequence[str], tracking_uri: str | Callable[[], str],
               output_dir: str = DEFAULT_OUTPUT_DIR) -> list[str]:
    """The fliqs command line for ``argv``: cluster defaults added to ``search`` / ``study`` where absent.

    Pure apart from ``tracking_uri``, which may be a callable: it is called only when ``tracking.uri`` is missing.
    """
    argv = list(argv)
    if not argv or argv[0] not in CLUSTER_COMMANDS:
        return argv
    given = override_keys(argv[1:])
    extra = []
    if "ray_address" not in given:
        extra.append("ray_address=auto")
    if "tracking.uri" not in given:
        extra.append(f"tracking.uri={tracking_uri() if callable(tracking_uri) else tracking_uri}")
    if "output_dir" not in given:
        extra.append(f"output_dir={output_dir}")
    return argv + extra


def node_ip() -> str:
    """This node's private IP: the first address of ``hostname -I``, the one the cluster YAML binds MLflow to."""
    try:
        out = subprocess.run(["hostname", "-I"], capture_output=True, text=True, check=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        out = ""
    if out.split():
        return out.split()[0]
    import ray.util

    return ray.util.get_node_ip_address()


def default_tracking_uri(environ: Mapping[str, str] | None = None, ip: Callable[[], str] = node_ip) -> str:
    """``$FLIQS_TRACKING_URI``, else the head's MLflow server (this script runs on the head)."""
    environ = os.environ if environ is None else environ
    return environ.get(TRACKING_URI_ENV) or f"http://{ip()}:{MLFLOW_PORT}"


def main(argv: Sequence[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    args = build_argv(argv, default_tracking_uri)
    print("fliqs " + " ".join(args), file=sys.stderr, flush=True)
    from fliqs.cli import main as fliqs_main

    fliqs_main(args)


if __name__ == "__main__":
    main()
