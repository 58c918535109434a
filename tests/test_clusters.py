"""Offline checks of the cluster launch files in clusters/ (fast; no cloud access).

No cloud provider can exist here (no credentials, no network), so nothing is launched. What can be checked offline:

- every Ray cluster launcher YAML goes through Ray's own ``prepare_config`` (defaults of the provider, merged setup
  commands, docker and min/max-worker checks; it reads only files shipped with Ray) and ``validate_config`` (the
  JSON schema ``ray up`` applies before it calls the cloud), with the network blocked to prove it stays offline;
- every shell command of those YAMLs parses (``bash -n``);
- the properties fliqs relies on: fliqs installed from the mounted repository with the constraints file, MLflow
  bound to the head's private address with its store on shared storage, Ray's token authentication kept on,
  GPU workers and a CPU head, no secrets anywhere under clusters/;
- the KubeRay manifests' required fields (they cannot be checked against the CRDs without a Kubernetes API);
- ``clusters/submit_entry.py``'s argument building (a pure function) and that fliqs accepts what it builds.
"""

from __future__ import annotations

import copy
import importlib.util
import ipaddress
import json
import re
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]
CLUSTERS = ROOT / "clusters"
LAUNCHERS = ["aws.yaml", "gcp.yaml", "onprem.yaml"]
KUBERAY = CLUSTERS / "kuberay"
SHARED = "/mnt/shared"
COMMAND_KEYS = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
                "head_start_ray_commands", "worker_start_ray_commands")


def _ray_version() -> str:
    pins = dict(line.split("==") for line in (ROOT / "constraints.txt").read_text().split()
                if "==" in line and not line.startswith("#"))
    return pins["ray"]


def load_launcher(name: str) -> dict:
    with open(CLUSTERS / name) as f:
        return yaml.safe_load(f)


def prepared(name: str) -> dict:
    return prepare_config(copy.deepcopy(load_launcher(name)))


def all_commands(cfg: dict) -> list[str]:
    return [cmd for key in COMMAND_KEYS for cmd in cfg.get(key) or []]


def mlflow_commands(cfg: dict) -> list[str]:
    return [c for c in cfg["head_start_ray_commands"] if "mlflow server" in c]


def option(command: str, name: str) -> str:
    """The value of ``--name VALUE`` in a command line; a ``$(...)`` value is returned whole."""
    m = re.search(rf"{re.escape(name)}[ =](\$\([^)]*\)|\S+)", command)
    assert m, f"{name} missing in: {command}"
    return m.group(1)


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a network connection fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


# ---------------------------------------------------------------- Ray cluster launcher YAMLs


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_validates_with_rays_own_schema_offline(name, no_network):
    cfg = prepared(name)
    validate_config(cfg)  # raises jsonschema.ValidationError / ValueError on a bad config
    assert cfg["cluster_name"] == "fliqs"
    assert cfg["head_node_type"] in cfg["available_node_types"]


def test_validator_is_not_a_rubber_stamp():
    cfg = prepared("aws.yaml")
    cfg["setup_command"] = cfg.pop("setup_commands")  # a typo `ray up` must reject
    with pytest.raises(jsonschema.ValidationError):
        validate_config(cfg)
    cfg = prepared("gcp.yaml")
    cfg["available_node_types"]["worker_gpu"]["min_workers"] = cfg["max_workers"] + 1
    with pytest.raises(ValueError, match="max_workers"):
        validate_config(cfg)


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
@pytest.mark.parametrize("name", LAUNCHERS)
def test_every_shell_command_parses(name):
    for cmd in all_commands(prepared(name)):
        result = subprocess.run(["bash", "-n", "-c", cmd], capture_output=True, text=True)
        assert result.returncode == 0, f"{cmd}\n{result.stderr}"


@pytest.mark.parametrize("name", LAUNCHERS)
def test_repository_mounted_and_fliqs_installed_with_constraints_on_every_node(name):
    cfg = load_launcher(name)
    assert cfg["file_mounts"]["~/fliqs"] == "."  # the repository root (`ray up` runs from it)
    assert ".gitignore" in cfg["rsync_filter"]  # no .venv or runs/ uploaded
    install = [c for c in cfg["setup_commands"] if re.search(r"pip install .*-e ~/fliqs\b", c)]
    assert len(install) == 1, cfg["setup_commands"]
    assert re.search(r"-c ~/fliqs/constraints\.txt\b", install[0])
    # setup_commands run on head and workers alike: prepare_config merges them into both lists
    merged = prepared(name)
    assert install[0] in merged["head_setup_commands"]
    assert install[0] in merged["worker_setup_commands"]


@pytest.mark.parametrize("name", LAUNCHERS)
def test_mlflow_server_on_the_heads_private_address_with_shared_storage(name):
    cfg = load_launcher(name)
    [cmd] = mlflow_commands(cfg)
    host = option(cmd, "--host")
    if host.startswith("$("):
        assert "hostname -I" in host, host  # the node's primary private address
    else:
        ip = ipaddress.ip_address(host)
        assert ip.is_private and not ip.is_loopback and not ip.is_unspecified, host
    assert host not in ("0.0.0.0", "::", "[::]", "*")
    assert option(cmd, "--port") == "5000"
    store = option(cmd, "--backend-store-uri")
    assert store == f"sqlite:///{SHARED}/mlflow/mlflow.db"
    assert option(cmd, "--artifacts-destination").startswith(f"{SHARED}/mlflow/")
    # started in the background, surviving the SSH session, and only when not already serving
    assert "nohup" in cmd and "/health" in cmd
    # only after Ray: the server is the last head start command
    assert cfg["head_start_ray_commands"].index(cmd) > 0
    assert "0.0.0.0" not in cmd


@pytest.mark.parametrize("name", LAUNCHERS)
def test_shared_storage_mounted_on_every_node(name):
    cfg = load_launcher(name)
    init = " ".join(cfg["initialization_commands"])
    assert f"mountpoint -q {SHARED}" in init and "mount -t nfs" in init
    if "docker" in cfg:
        assert f"-v {SHARED}:{SHARED}" in cfg["docker"]["run_options"]


@pytest.mark.parametrize("name", LAUNCHERS)
def test_token_authentication_kept_on(name):
    cfg = load_launcher(name)
    assert cfg["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"  # the same token on every node
    starts = [c for c in cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"] if "ray start" in c]
    assert len(starts) == 2
    for cmd in starts:
        assert "RAY_AUTH_MODE=token" in cmd, cmd
    if "docker" in cfg:
        assert "-e RAY_AUTH_MODE=token" in cfg["docker"]["run_options"]


@pytest.mark.parametrize("name", ["aws.yaml", "gcp.yaml"])
def test_cloud_launchers_have_a_cpu_head_and_gpu_workers(name):
    cfg = load_launcher(name)
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    workers = [t for n, t in types.items() if n != cfg["head_node_type"]]
    assert workers and all(w["max_workers"] >= 1 for w in workers)
    if cfg["provider"]["type"] == "aws":
        assert not re.match(r"(g\d|p\d)", head["node_config"]["InstanceType"])
        assert all(re.match(r"(g5|g6|p4|p5)", w["node_config"]["InstanceType"]) for w in workers)
    else:
        assert "GPU" not in head["resources"] and "guestAccelerators" not in head["node_config"]
        for w in workers:
            assert w["resources"]["GPU"] >= 1
            assert w["node_config"]["machineType"].startswith(("a2-", "a3-", "g2-")) or w["node_config"].get(
                "guestAccelerators")
            assert w["node_config"]["scheduling"]["onHostMaintenance"] == "TERMINATE"
    assert cfg["docker"]["image"] == f"rayproject/ray:{_ray_version()}-py311-gpu"


def test_onprem_uses_the_local_provider_with_placeholder_addresses():
    cfg = load_launcher("onprem.yaml")
    provider = cfg["provider"]
    assert provider["type"] == "local"
    for ip in [provider["head_ip"], *provider["worker_ips"]]:
        assert ipaddress.ip_address(ip) in ipaddress.ip_network("192.0.2.0/24")  # documentation range
    merged = prepared("onprem.yaml")
    assert merged["available_node_types"]["local.cluster.node"]["max_workers"] == len(provider["worker_ips"])


# ---------------------------------------------------------------- every file under clusters/

SECRET_PATTERNS = [
    r"(?i)aws_secret_access_key",
    r"(?i)aws_access_key_id\s*[:=]",
    r"AKIA[0-9A-Z]{16}",
    r"-----BEGIN [A-Z ]*PRIVATE KEY-----",
    r"BEGIN PRIVATE KEY",
    r"(?i)\bpassword\s*[:=]\s*\S+",
    r"(?i)\b(secret|token)\s*[:=]\s*['\"][^'\"]{8,}['\"]",
    r"://[^/\s:@]+:[^/\s@]+@",  # user:password@host in a URI
    r"(?i)\"private_key\"\s*:",  # a GCP service-account key file
]


def cluster_files() -> list[Path]:
    files = [p for p in CLUSTERS.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    assert len(files) >= 9
    return files


def test_no_secrets_anywhere_under_clusters():
    for path in cluster_files():
        text = path.read_text()
        for pattern in SECRET_PATTERNS:
            m = re.search(pattern, text)
            assert m is None, f"{path.relative_to(ROOT)}: secret-looking text {m.group(0)!r}"


def test_token_authentication_never_disabled():
    for path in [*cluster_files(), ROOT / "README.md"]:
        text = path.read_text()
        assert not re.search(r"RAY_AUTH_MODE\s*[=:]\s*['\"]?disabled", text), path
        assert not re.search(r"mode:\s*['\"]?(disabled|none)\b", text), path


# ---------------------------------------------------------------- KubeRay manifests


def manifests(name: str) -> list[dict]:
    with open(KUBERAY / name) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def the(name: str, kind: str) -> dict:
    [doc] = [d for d in manifests(name) if d["kind"] == kind]
    return doc


def check_ray_cluster_spec(spec: dict) -> None:
    assert spec["rayVersion"] == _ray_version()
    assert spec["authOptions"]["mode"] == "token"
    head = spec["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict)
    pod = head["template"]["spec"]
    containers = {c["name"]: c for c in pod["containers"]}
    ray_head = pod["containers"][0]
    assert ray_head["image"]
    assert {p["containerPort"] for p in ray_head["ports"]} >= {6379, 8265, 10001, 5000}
    assert "nvidia.com/gpu" not in ray_head["resources"].get("limits", {})  # CPU head
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"]
              for v in pod["volumes"] if "persistentVolumeClaim" in v}
    assert claims == {"shared": "fliqs-shared"}
    assert {"name": "shared", "mountPath": SHARED} in ray_head["volumeMounts"]

    mlflow = containers["mlflow"]
    assert mlflow["image"] == ray_head["image"]
    command = " ".join(mlflow["command"] + mlflow["args"])
    assert "mlflow server" in command
    assert option(command, "--backend-store-uri") == f"sqlite:///{SHARED}/mlflow/mlflow.db"
    assert option(command, "--artifacts-destination").startswith(f"{SHARED}/mlflow/")
    assert option(command, "--port") == "5000"
    assert {"name": "shared", "mountPath": SHARED} in mlflow["volumeMounts"]
    assert mlflow["readinessProbe"]["httpGet"]["path"] == "/health"
    assert head.get("serviceType", "ClusterIP") == "ClusterIP"  # in-pod 0.0.0.0 stays inside the cluster network

    groups = spec["workerGroupSpecs"]
    assert groups
    for group in groups:
        assert group["groupName"]
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        assert isinstance(group["rayStartParams"], dict)
        wpod = group["template"]["spec"]
        worker = wpod["containers"][0]
        assert worker["image"] == ray_head["image"]
        assert int(worker["resources"]["limits"]["nvidia.com/gpu"]) >= 1
        assert {"name": "shared", "mountPath": SHARED} in worker["volumeMounts"]
        assert any(v.get("persistentVolumeClaim", {}).get("claimName") == "fliqs-shared" for v in wpod["volumes"])


def test_raycluster_manifest():
    [doc] = manifests("raycluster.yaml")
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayCluster"
    assert doc["metadata"]["name"] == "fliqs"  # -> service fliqs-head-svc, used in the READMEs
    check_ray_cluster_spec(doc["spec"])
    assert "fliqs-head-svc" in (CLUSTERS / "README.md").read_text()


def test_rayjob_manifest():
    [doc] = manifests("rayjob.yaml")
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayJob"
    assert doc["metadata"]["name"]
    spec = doc["spec"]
    assert ("rayClusterSpec" in spec) != ("clusterSelector" in spec)
    check_ray_cluster_spec(spec["rayClusterSpec"])
    assert spec["shutdownAfterJobFinishes"] is True
    entry = shlex.split(spec["entrypoint"])
    assert entry[:3] == ["python", "/home/ray/fliqs/clusters/submit_entry.py", "search"]
    assert yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"]["HF_HUB_OFFLINE"] == "1"
    # the entrypoint's overrides are valid fliqs configuration once submit_entry adds the cluster defaults
    from fliqs.config import load_config

    submit_entry = load_submit_entry()
    cfg = load_config(submit_entry.build_argv(entry[2:], "http://10.0.0.5:5000")[1:])
    assert cfg.train.use_gpu and cfg.output_dir == f"{SHARED}/fliqs" and cfg.ray_address == "auto"


def test_shared_volume_claim():
    [doc] = manifests("pvc.yaml")
    assert doc["kind"] == "PersistentVolumeClaim" and doc["metadata"]["name"] == "fliqs-shared"
    assert doc["spec"]["accessModes"] == ["ReadWriteMany"]  # pods on several nodes write checkpoints


def test_image_pins_the_same_ray_and_installs_with_constraints():
    text = (CLUSTERS / "Dockerfile").read_text()
    assert f"FROM rayproject/ray:{_ray_version()}-py311-gpu" in text
    assert re.search(r"pip install .*-c /home/ray/fliqs/constraints\.txt -e /home/ray/fliqs", text)
    ignored = (CLUSTERS / "Dockerfile.dockerignore").read_text().split()
    assert {".venv", "runs", ".git"} <= set(ignored)


# ---------------------------------------------------------------- submit_entry.py


def load_submit_entry():
    spec = importlib.util.spec_from_file_location("submit_entry", CLUSTERS / "submit_entry.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def entry():
    return load_submit_entry()


def test_defaults_added_when_absent(entry):
    argv = entry.build_argv(["search", "name=s1", "train.num_workers=2"], "http://10.1.2.3:5000")
    assert argv == ["search", "name=s1", "train.num_workers=2", "ray_address=auto",
                    "tracking.uri=http://10.1.2.3:5000", "output_dir=/mnt/shared/fliqs"]
    assert entry.build_argv(["study"], "http://h:5000") == [
        "study", "ray_address=auto", "tracking.uri=http://h:5000", "output_dir=/mnt/shared/fliqs"]


def test_given_values_are_kept(entry):
    def unused() -> str:
        raise AssertionError("tracking URI looked up although tracking.uri was given")

    given = ["search", "ray_address=10.0.0.9:6379", "tracking.uri=http://mlflow:5000", "output_dir=/mnt/x"]
    assert entry.build_argv(given, unused) == given
    partial = entry.build_argv(["study", "output_dir=/data/out"], lambda: "http://10.0.0.1:5000")
    assert partial == ["study", "output_dir=/data/out", "ray_address=auto", "tracking.uri=http://10.0.0.1:5000"]
    assert sum(a.startswith("output_dir=") for a in partial) == 1


def test_other_commands_pass_through(entry):
    for argv in (["formats", "--json"], ["cost", "--model", "resnet18"], ["pareto", "--experiment", "fliqs"], []):
        assert entry.build_argv(argv, "http://unused:5000") == argv


def test_default_tracking_uri(entry):
    assert entry.default_tracking_uri({"FLIQS_TRACKING_URI": "http://mlflow.internal:5000"},
                                      ip=lambda: "10.0.0.1") == "http://mlflow.internal:5000"
    assert entry.default_tracking_uri({}, ip=lambda: "10.0.0.7") == "http://10.0.0.7:5000"


def test_main_hands_the_built_command_line_to_fliqs(entry, monkeypatch):
    import fliqs.cli

    seen = []
    monkeypatch.setattr(fliqs.cli, "main", lambda argv: seen.append(argv))
    monkeypatch.setenv("FLIQS_TRACKING_URI", "http://10.9.8.7:5000")
    entry.main(["search", "name=x"])
    assert seen == [["search", "name=x", "ray_address=auto", "tracking.uri=http://10.9.8.7:5000",
                     "output_dir=/mnt/shared/fliqs"]]
    with pytest.raises(SystemExit) as exit_info:
        entry.main([])
    assert exit_info.value.code == 2


def test_runs_next_to_the_repository_as_ray_submit_places_it(tmp_path):
    """`ray submit` copies the script to ~/ and runs `python ~/submit_entry.py`, with the repository at ~/fliqs."""
    (tmp_path / "fliqs").symlink_to(ROOT, target_is_directory=True)
    shutil.copy(CLUSTERS / "submit_entry.py", tmp_path / "submit_entry.py")
    result = subprocess.run([sys.executable, "submit_entry.py", "formats", "--json"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert any(row["name"] == "fp8_e4m3" for row in json.loads(result.stdout))
