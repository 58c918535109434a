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

Every check about a YAML file parses it (``yaml.safe_load_all``) and looks its values up by key; a shell command
found there is split into simple commands and words (``simple_commands``, built on ``shlex``) before its programs
and options are checked. Only the secrets and auth-disabled scans read raw text, to cover comments too.
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
from dataclasses import dataclass
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from fliqs.run.config import DEFAULT_EXPERIMENT

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


def _load(name: str) -> list:
    """The parsed YAML documents of ``clusters/<name>`` (empty documents left out)."""
    with open(CLUSTERS / name) as f:
        return [doc for doc in yaml.safe_load_all(f) if doc is not None]


def load_launcher(name: str) -> dict:
    [cfg] = _load(name)
    return cfg


def prepared(name: str) -> dict:
    return prepare_config(copy.deepcopy(load_launcher(name)))


def all_commands(cfg: dict) -> list[str]:
    return [cmd for key in COMMAND_KEYS for cmd in cfg.get(key) or []]


# ---------------------------------------------------------------- shell command lines, word by word

_SUBSTITUTION = re.compile(r"\$\([^()]*\)")  # $(...) without nesting, which is all these files use
_HIDDEN = re.compile(r"__SUBSTITUTION(\d+)__")
_OPERATORS = {";", ";;", "&", "&&", "||", "|", "(", ")"}
_RESERVED = {"if", "then", "elif", "else", "fi", "while", "until", "do", "done", "!", "{", "}"}
_REDIRECTIONS = {"<", ">", ">>", ">&", "<&", "&>", "&>>", ">|", "<>"}
_WRAPPERS = {"sudo", "nohup", "exec"}


@dataclass
class Simple:
    """One simple command of a shell command line."""

    argv: list[str]  # its words (quotes removed, a $(...) kept as one word), redirections left out
    keywords: list[str]  # the reserved words just before it (``if``, ``!``, ``then``, ``{`` ...)
    then: str  # the operator that ends it (``;``, ``&&``, ``||``, ``|``, ``&``), "" at the end of the line

    @property
    def program(self) -> list[str]:
        """argv without leading ``sudo``/``nohup``/``exec`` and ``VAR=value`` assignments."""
        words = list(self.argv)
        while words and (words[0] in _WRAPPERS or re.fullmatch(r"[A-Za-z_]\w*=.*", words[0])):
            words.pop(0)
        return words


def simple_commands(line: str) -> list[Simple]:
    """Split a shell command line into its simple commands (shlex, with shell operators as separate tokens)."""
    hidden: list[str] = []

    def hide(m: re.Match) -> str:
        hidden.append(m.group(0))
        return f"__SUBSTITUTION{len(hidden) - 1}__"

    lexer = shlex.shlex(_SUBSTITUTION.sub(hide, line), posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands: list[Simple] = []
    argv: list[str] = []
    keywords: list[str] = []
    redirected = False
    for token in lexer:
        if token in _OPERATORS:
            if argv:
                commands.append(Simple(argv, keywords, token))
            argv, keywords, redirected = [], [], False
        elif not argv and token in _RESERVED:
            keywords.append(token)
        elif redirected or token in _REDIRECTIONS:
            redirected = True  # the rest of this simple command is redirections (all these files put them last)
        else:
            argv.append(_HIDDEN.sub(lambda m: hidden[int(m.group(1))], token))
    if argv:
        commands.append(Simple(argv, keywords, ""))
    return commands


def find(lines: list[str], *program: str) -> list[tuple[int, list[Simple], int]]:
    """(line index, that line's simple commands, index among them) of each simple command running ``program``."""
    hits = []
    for i, line in enumerate(lines):
        commands = simple_commands(line)
        hits += [(i, commands, j) for j, c in enumerate(commands) if c.program[:len(program)] == list(program)]
    return hits


def options(argv: list[str], name: str) -> list[str]:
    """Every value given to ``name`` in argv, as ``name VALUE`` or ``name=VALUE``."""
    values = []
    for i, word in enumerate(argv):
        if word == name:
            assert i + 1 < len(argv), f"{name} without a value in {argv}"
            values.append(argv[i + 1])
        elif word.startswith(name + "="):
            values.append(word[len(name) + 1:])
    return values


def option(argv: list[str], name: str) -> str:
    values = options(argv, name)
    assert len(values) == 1, f"{name} given {len(values)} times in {argv}"
    return values[0]


def environment_before(commands: list[Simple], j: int) -> dict[str, str]:
    """The variables ``export``ed before commands[j] on its line or assigned in front of it."""
    env = {}
    for c in commands[:j]:
        if c.argv[0] == "export":
            env.update(word.split("=", 1) for word in c.argv[1:] if "=" in word)
    for word in commands[j].argv:
        if not re.fullmatch(r"[A-Za-z_]\w*=.*", word):
            break
        env.update([word.split("=", 1)])
    return env


def docker_options(cfg: dict) -> list[list[str]]:
    return [shlex.split(o) for o in cfg["docker"]["run_options"]]


def test_simple_commands_splits_the_way_the_checks_rely_on():
    commands = simple_commands("export A=1; if ! wget -q \"http://$(hostname -I | awk '{print $1}'):5/h\"; then "
                               "nohup srv --host $(hostname -I) --port 5 > log 2>&1 < /dev/null & fi")
    assert [c.argv for c in commands] == [["export", "A=1"],
                                          ["wget", "-q", "http://$(hostname -I | awk '{print $1}'):5/h"],
                                          ["nohup", "srv", "--host", "$(hostname -I)", "--port", "5"]]
    assert [c.keywords for c in commands] == [[], ["if", "!"], ["then"]]
    assert [c.then for c in commands] == [";", ";", "&"]
    assert commands[2].program == ["srv", "--host", "$(hostname -I)", "--port", "5"]
    assert environment_before(commands, 2) == {"A": "1"}
    assert option(["x", "--port=1"], "--port") == "1"
    with pytest.raises(AssertionError):
        option(["x", "--port", "1", "--port", "2"], "--port")
    with pytest.raises(AssertionError):
        option(["x"], "--port")


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


def bash_parses(cmd: str) -> None:
    result = subprocess.run(["bash", "-n", "-c", cmd], capture_output=True, text=True)
    assert result.returncode == 0, f"{cmd}\n{result.stderr}"


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
@pytest.mark.parametrize("name", LAUNCHERS)
def test_every_shell_command_parses(name):
    for cmd in all_commands(prepared(name)):
        bash_parses(cmd)


@pytest.mark.parametrize("name", LAUNCHERS)
def test_repository_mounted_and_fliqs_installed_with_constraints_on_every_node(name):
    cfg = load_launcher(name)
    assert cfg["file_mounts"]["~/fliqs"] == "."  # the repository root (`ray up` runs from it)
    assert ".gitignore" in cfg["rsync_filter"]  # no .venv or runs/ uploaded
    installs = [(i, c.program) for i, line in enumerate(cfg["setup_commands"]) for c in simple_commands(line)
                if Path(c.program[0]).name == "pip" and c.program[1:2] == ["install"]
                and "~/fliqs" in options(c.program, "-e")]
    assert len(installs) == 1, cfg["setup_commands"]
    [(i, argv)] = installs
    assert option(argv, "-e") == "~/fliqs"
    assert option(argv, "-c") == "~/fliqs/constraints.txt"
    # setup_commands run on head and workers alike: prepare_config merges them into both lists
    merged = prepared(name)
    assert cfg["setup_commands"][i] in merged["head_setup_commands"]
    assert cfg["setup_commands"][i] in merged["worker_setup_commands"]


@pytest.mark.parametrize("name", LAUNCHERS)
def test_mlflow_server_on_the_heads_private_address_with_shared_storage(name):
    cfg = load_launcher(name)
    assert len(find(all_commands(cfg), "mlflow", "server")) == 1  # one server, started once, on the head
    starts = cfg["head_start_ray_commands"]
    [(line, commands, j)] = find(starts, "mlflow", "server")
    server = commands[j]
    argv = server.program
    host = option(argv, "--host")
    if host.startswith("$("):
        assert simple_commands(host[2:-1])[0].argv == ["hostname", "-I"], host  # the node's primary private address
    else:
        ip = ipaddress.ip_address(host)
        assert ip.is_private and not ip.is_loopback and not ip.is_unspecified, host
    assert host not in ("0.0.0.0", "::", "[::]", "*")
    assert option(argv, "--port") == "5000"
    assert option(argv, "--backend-store-uri") == f"sqlite:///{SHARED}/mlflow/mlflow.db"
    assert option(argv, "--artifacts-destination").startswith(f"{SHARED}/mlflow/")
    # started in the background, surviving the SSH session, and only when not already serving
    assert server.argv[0] == "nohup" and server.then == "&", server
    assert server.keywords == ["then"], server
    [probe] = [c for c in commands[:j] if c.program[:1] == ["wget"]]
    assert probe.keywords == ["if", "!"] and probe.argv[-1] == f"http://{host}:5000/health", probe
    # only after Ray
    [(ray_line, _, _)] = find(starts, "ray", "start")
    assert line > ray_line
    assert not [w for c in commands for w in c.argv if "0.0.0.0" in w]


@pytest.mark.parametrize("name", LAUNCHERS)
def test_shared_storage_mounted_on_every_node(name):
    cfg = load_launcher(name)
    [(_, commands, j)] = find(cfg["initialization_commands"], "mount")
    mount = commands[j].program
    assert option(mount, "-t") in ("nfs", "nfs4") and mount[-1] == SHARED, mount
    # only when not mounted yet: the line starts with `mountpoint -q /mnt/shared ||`
    assert commands[0].argv == ["mountpoint", "-q", SHARED] and commands[0].then == "||", commands[0]
    if "docker" in cfg:
        assert ["-v", f"{SHARED}:{SHARED}"] in docker_options(cfg)


@pytest.mark.parametrize("name", LAUNCHERS)
def test_token_authentication_kept_on(name):
    cfg = load_launcher(name)
    assert cfg["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"  # the same token on every node
    assert len(find(cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"], "ray", "start")) == 2
    for key, role in (("head_start_ray_commands", "--head"), ("worker_start_ray_commands", "--address")):
        [(_, commands, j)] = find(cfg[key], "ray", "start")
        assert role in commands[j].argv or options(commands[j].argv, role), commands[j]
        assert environment_before(commands, j).get("RAY_AUTH_MODE") == "token", commands
    if "docker" in cfg:
        assert ["-e", "RAY_AUTH_MODE=token"] in docker_options(cfg)


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


def secrets_in(text: str) -> list[str]:
    """Secret-looking snippets of text: a text scan, so that comments and every file type are covered."""
    return [m.group(0) for pattern in SECRET_PATTERNS for m in re.finditer(pattern, text)]


def cluster_files() -> list[Path]:
    files = [p for p in CLUSTERS.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    assert len(files) >= 9
    return files


def test_no_secrets_anywhere_under_clusters():
    for path in cluster_files():
        found = secrets_in(path.read_text())
        assert not found, f"{path.relative_to(ROOT)}: secret-looking text {found!r}"


def test_secret_scan_catches_secrets():
    fake_key = "AKIA" + "EXAMPLE0FAKE0KEY"  # the AWS access key id shape, split so this file holds none
    planted = [
        f"# aws_access_key_id = {fake_key}",
        "aws_secret_access_key: x",
        "-----BEGIN OPENSSH " + "PRIVATE KEY-----",
        "-----BEGIN " + "PRIVATE KEY-----",
        "password: hunter22",
        "token: 'abcdefgh12345678'",
        "--backend-store-uri postgresql://mlflow:" + "s3cret@db:5432/mlflow",
        '{"type": "service_account", "private_key": "..."}',
    ]
    for text in planted:
        assert secrets_in(text), text
    assert fake_key in secrets_in(f"    # an example: {fake_key}\n")  # found in a comment, mid-file
    assert not secrets_in((CLUSTERS / "aws.yaml").read_text())
    assert not secrets_in("postgresql://mlflow@db.example.internal:5432/mlflow  # the password from ~/.pgpass")


def auth_modes(node, where: str = "") -> list[tuple[str, str]]:
    """(where, mode) of every Ray authentication mode a parsed YAML document sets: KubeRay ``authOptions``, a
    ``RAY_AUTH_MODE`` key (runtime env ``env_vars``, parsed out of ``runtimeEnvYAML``), a container ``env`` entry
    named RAY_AUTH_MODE, and ``RAY_AUTH_MODE=...`` in a command or docker option string."""
    found = []
    if isinstance(node, dict):
        if node.get("name") == "RAY_AUTH_MODE":  # a Kubernetes env entry
            found.append((where, str(node.get("value", node.get("valueFrom")))))
        for key, value in node.items():
            here = f"{where}.{key}"
            if key == "authOptions":
                found.append((here, str(value.get("mode"))))
            elif key == "RAY_AUTH_MODE":
                found.append((here, str(value)))
            if key == "runtimeEnvYAML":
                found += auth_modes(yaml.safe_load(value), here)
            else:
                found += auth_modes(value, here)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            found += auth_modes(value, f"{where}[{i}]")
    elif isinstance(node, str):
        found += [(where, m.group(1)) for m in re.finditer(r"\bRAY_AUTH_MODE=['\"]?([\w-]*)", node)]
    return found


YAML_FILES = [*LAUNCHERS, "kuberay/raycluster.yaml", "kuberay/rayjob.yaml", "kuberay/pvc.yaml"]


@pytest.mark.parametrize("name", YAML_FILES)
def test_token_authentication_never_disabled_in_the_yaml(name):
    modes = auth_modes(_load(name))
    assert all(mode == "token" for _, mode in modes), modes
    if name != "kuberay/pvc.yaml":  # every file that starts Ray sets the mode
        assert modes


def test_auth_mode_walk_sees_every_place_a_mode_is_set():
    cfg = load_launcher("onprem.yaml")
    cfg["worker_start_ray_commands"][1] = cfg["worker_start_ray_commands"][1].replace("=token", "=disabled")
    job = copy.deepcopy(_load("kuberay/rayjob.yaml"))
    job[0]["spec"]["rayClusterSpec"]["authOptions"]["mode"] = "none"
    job[0]["spec"]["runtimeEnvYAML"] += "  RAY_AUTH_MODE: disabled\n"
    job[0]["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"] = [
        {"name": "RAY_AUTH_MODE", "value": "disabled"}]
    bad = sorted(where for where, mode in auth_modes([cfg, job]) if mode != "token")
    assert len(bad) == 4, bad
    assert any("worker_start_ray_commands" in w for w in bad) and any("authOptions" in w for w in bad)
    assert any("runtimeEnvYAML" in w for w in bad) and any("containers[0]" in w for w in bad)


AUTH_DISABLED_PATTERNS = [r"RAY_AUTH_MODE\s*[=:]\s*['\"]?disabled", r"mode:\s*['\"]?(disabled|none)\b"]


def auth_disabled_in(text: str) -> bool:
    return any(re.search(pattern, text) for pattern in AUTH_DISABLED_PATTERNS)


def test_token_authentication_never_disabled_in_any_text():
    """A text scan on top of the structural check: no file (README.md, Dockerfile, YAML comments) tells anyone to
    turn authentication off."""
    for path in [*cluster_files(), ROOT / "README.md"]:
        assert not auth_disabled_in(path.read_text()), path
    assert auth_disabled_in("#   RAY_AUTH_MODE=disabled ray start --head")
    assert auth_disabled_in("  authOptions:\n    mode: none\n")
    assert not auth_disabled_in("export RAY_AUTH_MODE=token; ray start --head")


# ---------------------------------------------------------------- KubeRay manifests


def manifests(name: str) -> list[dict]:
    return _load(f"kuberay/{name}")


def the(name: str, kind: str) -> dict:
    [doc] = [d for d in manifests(name) if d["kind"] == kind]
    return doc


def cluster_specs(name: str) -> list[dict]:
    """The RayCluster specs of a KubeRay manifest (a RayCluster's spec, a RayJob's rayClusterSpec)."""
    specs = []
    for doc in manifests(name):
        if doc["kind"] == "RayCluster":
            specs.append(doc["spec"])
        elif doc["kind"] == "RayJob" and "rayClusterSpec" in doc["spec"]:
            specs.append(doc["spec"]["rayClusterSpec"])
    return specs


def pods(spec: dict) -> list[dict]:
    return [spec["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in spec["workerGroupSpecs"]]


def container_scripts(spec: dict) -> list[str]:
    """The shell scripts of the containers that run ``bash -c SCRIPT``."""
    scripts = []
    for pod in pods(spec):
        for c in pod["containers"]:
            if c.get("command") and Path(c["command"][0]).name in ("bash", "sh") and c["command"][1:] == ["-c"]:
                scripts += c["args"][:1]
    return scripts


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
@pytest.mark.parametrize("name", ["raycluster.yaml", "rayjob.yaml"])
def test_every_kuberay_shell_script_parses(name):
    scripts = [s for spec in cluster_specs(name) for s in container_scripts(spec)]
    scripts += [d["spec"]["entrypoint"] for d in manifests(name) if d["kind"] == "RayJob"]
    assert scripts
    for script in scripts:
        bash_parses(script)


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
    for c in pod["containers"]:
        assert all(e["name"] != "RAY_AUTH_MODE" or e.get("value") == "token" for e in c.get("env", [])), c["name"]

    mlflow = containers["mlflow"]
    assert mlflow["image"] == ray_head["image"]
    assert mlflow["command"] == ["/bin/bash", "-c"]
    [script] = mlflow["args"]
    [server] = [c for c in simple_commands(script) if c.program[:2] == ["mlflow", "server"]]
    assert server.argv[0] == "exec" and server.then == ""  # the server is the container's main process
    argv = server.program
    assert option(argv, "--backend-store-uri") == f"sqlite:///{SHARED}/mlflow/mlflow.db"
    assert option(argv, "--artifacts-destination").startswith(f"{SHARED}/mlflow/")
    assert option(argv, "--port") == "5000"
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
    from fliqs.run.loading import load_config

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
    for argv in (["formats", "--json"], ["cost", "--model", "resnet18"], ["pareto", "--experiment", DEFAULT_EXPERIMENT],
                 []):
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
