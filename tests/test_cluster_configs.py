"""Every cluster definition under cluster/ is valid, private, pinned like setup.cfg, and big enough for
what the pipelines ask for (configs/imagenet.yaml, configs/cifar10.yaml). Fast: no cluster is started."""
from __future__ import annotations

import configparser
import math
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from simsiam import config as C
from simsiam import submit

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = ROOT / "cluster"
YAML_FILES = sorted(CLUSTER.rglob("*.yaml"))
LAUNCHERS = [CLUSTER / "aws.yaml", CLUSTER / "gcp.yaml"]
TRAIN_PRESETS = ("imagenet", "cifar10")
SPOT_LABELS = {"eks.amazonaws.com/capacityType": "SPOT", "karpenter.sh/capacity-type": "spot",
               "cloud.google.com/gke-spot": "true", "cloud.google.com/gke-preemptible": "true"}


def _docs(path: Path) -> list:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _all_docs() -> list[tuple[Path, dict]]:
    return [(p, d) for p in YAML_FILES for d in _docs(p)]


def _kind(path: Path, doc: dict) -> str:
    if "available_node_types" in doc:
        return "launcher"
    if path.name == "runtime_env.yaml":
        return "runtime_env"
    if "featureGates" in doc:
        return "helm_values"
    return doc.get("kind", "?")


def _embedded_rayjobs() -> list[tuple[str, dict]]:
    """RayJob specs wherever they live: RayJob docs, RayCronJob templates, ConfigMap-held templates."""
    out = []
    for path, doc in _all_docs():
        kind = _kind(path, doc)
        if kind == "RayJob":
            out.append((f"{path.name}:{doc['metadata'].get('name')}", doc["spec"]))
        elif kind == "RayCronJob":
            out.append((f"{path.name}:{doc['metadata']['name']}.jobTemplate", doc["spec"]["jobTemplate"]))
        elif kind == "ConfigMap":
            for key, text in (doc.get("data") or {}).items():
                inner = yaml.safe_load(text)
                if isinstance(inner, dict) and inner.get("kind") == "RayJob":
                    out.append((f"{path.name}:{doc['metadata']['name']}/{key}", inner["spec"]))
    return out


def _ray_cluster_specs() -> list[tuple[str, dict]]:
    specs = [(f"{p.name}:{d['metadata']['name']}", d["spec"]) for p, d in _all_docs() if _kind(p, d) == "RayCluster"]
    specs += [(where, job["rayClusterSpec"]) for where, job in _embedded_rayjobs()]
    return specs


# --------------------------------------------------------------------------- capacity model


@dataclass
class NodeType:
    name: str
    gpus: float
    cpus: float
    min_nodes: int
    max_nodes: int
    spot: bool

    def slots(self, cpus_per_worker: float) -> int:
        """Train workers (1 GPU + cpus_per_worker CPUs each) one node holds, keeping a CPU for Ray Data."""
        return int(min(self.gpus // 1, (self.cpus - 1) // cpus_per_worker)) if self.gpus >= 1 else 0


def _launcher_gpu_types(cfg: dict) -> list[NodeType]:
    out = []
    for name, nt in cfg["available_node_types"].items():
        if name == cfg["head_node_type"]:
            continue
        res, nc = nt.get("resources") or {}, nt["node_config"]
        sched = nc.get("scheduling") or {}
        spot = (nc.get("InstanceMarketOptions", {}).get("MarketType") == "spot"
                or (isinstance(sched, dict) and (sched.get("provisioningModel") == "SPOT" or sched.get("preemptible"))))
        out.append(NodeType(name, float(res.get("GPU", 0)), float(res.get("CPU", 0)), nt.get("min_workers", 0),
                            nt["max_workers"], bool(spot)))
    return out


def _quantity(v) -> float:
    s = str(v)
    return float(s[:-1]) / 1000 if s.endswith("m") else float(s)


def _k8s_gpu_types(spec: dict) -> list[NodeType]:
    out = []
    for g in spec.get("workerGroupSpecs", []):
        pod = g["template"]["spec"]
        limits = pod["containers"][0]["resources"]["limits"]
        selector = pod.get("nodeSelector") or {}
        spot = any(selector.get(k) == v for k, v in SPOT_LABELS.items())
        out.append(NodeType(g["groupName"], _quantity(limits.get("nvidia.com/gpu", 0)), _quantity(limits["cpu"]),
                            g.get("minReplicas", 0), g["maxReplicas"], spot))
    return out


def _definitions() -> list[tuple[str, list[NodeType], int | None]]:
    """(name, GPU node types, cap on worker nodes) for every cluster definition."""
    defs = []
    for path in LAUNCHERS:
        cfg = yaml.safe_load(path.read_text())
        defs.append((path.name, _launcher_gpu_types(cfg), cfg["max_workers"]))
    defs += [(where, _k8s_gpu_types(spec), None) for where, spec in _ray_cluster_specs()]
    return defs


# --------------------------------------------------------------------------- pins


def _setup_requirements() -> dict[str, Requirement]:
    cp = configparser.ConfigParser()
    cp.read(ROOT / "setup.cfg")
    reqs = [Requirement(line) for line in cp["options"]["install_requires"].strip().splitlines() if line.strip()]
    return {r.name.lower(): r for r in reqs}


_PIN = re.compile(r"""["']?([A-Za-z0-9_.\-]+(?:\[[A-Za-z0-9_,\-]+\])?==[A-Za-z0-9_.+\-]+)["']?""")


def _pins_in(text: str) -> dict[str, Requirement]:
    return {Requirement(m).name.lower(): Requirement(m) for m in _PIN.findall(text)}


def _pin_sources() -> dict[str, dict[str, Requirement]]:
    env = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    sources = {"runtime_env.yaml pip": {Requirement(p).name.lower(): Requirement(p) for p in env["pip"]["packages"]}}
    for path in LAUNCHERS:
        cfg = yaml.safe_load(path.read_text())
        sources[f"{path.name} setup_commands"] = _pins_in(" ".join(cfg["setup_commands"]))
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    run_pip = re.search(r"RUN pip install(?:[^\n\\]|\\\n)*", dockerfile).group(0)  # with its continuations
    sources["Dockerfile"] = _pins_in(run_pip)
    return sources


# --------------------------------------------------------------------------- tests


def test_every_yaml_parses_and_is_a_known_kind():
    known = {"launcher", "runtime_env", "helm_values", "RayCluster", "RayJob", "RayCronJob", "CronJob",
             "ConfigMap", "ServiceAccount", "Role", "RoleBinding"}
    assert len(YAML_FILES) >= 7, YAML_FILES
    for path in YAML_FILES:
        docs = _docs(path)
        assert docs, f"{path}: empty"
        for doc in docs:
            assert isinstance(doc, dict), f"{path}: a document is {type(doc).__name__}, not a mapping"
            assert _kind(path, doc) in known, f"{path}: unrecognised document kind {_kind(path, doc)!r}"


@pytest.mark.parametrize("path", LAUNCHERS, ids=lambda p: p.name)
def test_launcher_config_is_valid_for_ray(path):
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = yaml.safe_load(path.read_text())
    for key in ("cluster_name", "provider", "available_node_types", "head_node_type", "max_workers",
                "setup_commands", "head_start_ray_commands", "worker_start_ray_commands"):
        assert key in cfg, f"{path.name}: missing {key}"
    assert cfg["provider"]["type"] == path.stem
    validate_config(prepare_config(cfg))  # Ray's own schema for cluster launcher files
    head = cfg["available_node_types"][cfg["head_node_type"]]
    assert (head.get("resources") or {}).get("GPU", 0) == 0, f"{path.name}: the head must be a CPU node"
    assert "guestAccelerators" not in head["node_config"]
    workers = _launcher_gpu_types(cfg)
    assert all(w.gpus >= 1 for w in workers), f"{path.name}: every worker type is a GPU type"
    for w in workers:
        assert 0 <= w.min_nodes <= w.max_nodes, f"{path.name}:{w.name}: min_workers > max_workers"
    assert sum(w.min_nodes for w in workers) <= cfg["max_workers"]
    assert any(w.spot for w in workers) and any(not w.spot for w in workers), \
        f"{path.name}: needs both a spot/preemptible and an on-demand GPU type"
    # Storage: GPU workers need credentials for s3:// (instance profile) or gs:// (service account).
    for name, nt in cfg["available_node_types"].items():
        if name != cfg["head_node_type"]:
            assert "IamInstanceProfile" in nt["node_config"] or "serviceAccounts" in nt["node_config"], \
                f"{path.name}:{name}: no storage credentials"
    images = [cfg["docker"]["image"], cfg["docker"]["head_image"]]
    assert all(img.startswith("rayproject/ray:") for img in images)


@pytest.mark.parametrize("path", LAUNCHERS, ids=lambda p: p.name)
def test_launcher_dashboard_stays_private_and_token_auth_is_on(path):
    cfg = yaml.safe_load(path.read_text())
    head_start = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start, f"{path.name}: the dashboard must bind 127.0.0.1"
    for cmds in ("head_start_ray_commands", "worker_start_ray_commands"):
        text = " ".join(cfg[cmds])
        assert "0.0.0.0" not in text, f"{path.name}:{cmds} binds 0.0.0.0"
        assert "RAY_AUTH_MODE=token" in text, f"{path.name}:{cmds}: token auth must be on on every node"
    assert any(o.replace("=", " ").split()[-2:] == ["RAY_AUTH_MODE", "token"] for o in cfg["docker"]["run_options"]), \
        f"{path.name}: the container's environment must carry RAY_AUTH_MODE=token"
    assert cfg["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token", \
        f"{path.name}: the token is synced from the launching machine, not stored in the repo"


def test_kubernetes_dashboard_is_cluster_internal_and_token_auth_is_on():
    specs = _ray_cluster_specs()
    assert len(specs) >= 4, [w for w, _ in specs]
    for where, spec in specs:
        head = spec["headGroupSpec"]
        assert head.get("serviceType", "ClusterIP") == "ClusterIP", f"{where}: head Service must be ClusterIP"
        assert not head.get("enableIngress"), f"{where}: no Ingress for the dashboard"
        assert (head.get("headService") or {}).get("spec", {}).get("type", "ClusterIP") == "ClusterIP"
        assert head.get("rayStartParams", {}).get("dashboard-host") != "0.0.0.0"
        assert spec.get("authOptions", {}).get("mode") == "token", f"{where}: Ray token auth must be on"
    for path, doc in _all_docs():
        assert doc.get("kind") not in ("Ingress", "Gateway", "HTTPRoute"), f"{path.name}: exposes a route"
        if doc.get("kind") == "Service":
            assert doc["spec"].get("type", "ClusterIP") == "ClusterIP", f"{path.name}: public Service"


def test_ray_cluster_manifests_have_the_required_fields():
    for where, spec in _ray_cluster_specs():
        assert spec["rayVersion"] == "2.60.0", where
        head = spec["headGroupSpec"]
        assert head["template"]["spec"]["containers"], f"{where}: head pod has no container"
        assert "GPU" not in head["rayStartParams"] and "num-gpus" not in head["rayStartParams"]
        head_limits = head["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert "nvidia.com/gpu" not in head_limits, f"{where}: the head is a CPU pod"
        groups = spec["workerGroupSpecs"]
        assert groups, f"{where}: no worker groups"
        assert len({g["groupName"] for g in groups}) == len(groups), f"{where}: duplicate group names"
        for g in groups:
            assert 0 <= g["minReplicas"] <= g.get("replicas", g["minReplicas"]) <= g["maxReplicas"], \
                f"{where}:{g['groupName']}: need minReplicas <= replicas <= maxReplicas"
            assert spec.get("enableInTreeAutoscaling") is True or g["minReplicas"] == g["maxReplicas"], \
                f"{where}: a min/max range needs the autoscaler"
    for path, doc in _all_docs():
        if _kind(path, doc) in ("RayCluster", "RayJob", "RayCronJob"):
            assert doc["apiVersion"] == "ray.io/v1", f"{path.name}: apiVersion"


def _check_entrypoint(where: str, entrypoint: str) -> None:
    argv = shlex.split(entrypoint)
    assert argv[:2] == ["python", "-m"] and argv[2].startswith("pipelines."), f"{where}: {entrypoint!r}"
    assert argv[2].split(".", 1)[1] in submit.KNOWN_PIPELINES, f"{where}: unknown pipeline {argv[2]}"
    rest, config = argv[3:], None
    while rest:
        a = rest.pop(0)
        if a.startswith("-"):
            if "=" not in a and rest:
                rest.pop(0)  # the option's value
            continue
        config = a
        break
    assert config, f"{where}: no config given"
    C.load(config)  # a preset (in the image under configs/) or a YAML file, and valid


def test_rayjobs_run_a_pipeline_and_clean_up():
    jobs = _embedded_rayjobs()
    assert {"RayJob", "RayCronJob", "ConfigMap"} <= {_kind(p, d) for p, d in _all_docs()}
    assert len(jobs) >= 3, [w for w, _ in jobs]
    from ray.runtime_env import RuntimeEnv

    for where, job in jobs:
        _check_entrypoint(where, job["entrypoint"])
        assert job.get("shutdownAfterJobFinishes") is True, f"{where}: the cluster must go when the job ends"
        assert job.get("activeDeadlineSeconds", 0) > 0, f"{where}: a hung job must end"
        env = yaml.safe_load(job.get("runtimeEnvYAML", "{}")) or {}
        assert isinstance(env, dict)
        RuntimeEnv(**env)
        assert "RAY_AUTH_TOKEN" not in (env.get("env_vars") or {}), f"{where}: token in the runtime env"


_CRON_FIELD = re.compile(r"^[\d*/,\-]+$")


def test_schedules_are_valid_and_retrain_runs_the_retrain_pipeline():
    schedules = []
    for path, doc in _all_docs():
        kind = _kind(path, doc)
        if kind in ("RayCronJob", "CronJob"):
            sched = doc["spec"]["schedule"]
            fields = sched.split()
            assert len(fields) == 5 and all(_CRON_FIELD.match(f) for f in fields), f"{path.name}: {sched!r}"
            schedules.append(kind)
        if kind == "RayCronJob":
            assert "pipelines.retrain" in doc["spec"]["jobTemplate"]["entrypoint"]
            # Pods come and go: the registry lives in object storage, not on a volume of the head pod.
            assert "--registry s3://" in doc["spec"]["jobTemplate"]["entrypoint"]
            # Runs may never overlap: the deadline is shorter than the weekly period.
            assert doc["spec"]["jobTemplate"]["activeDeadlineSeconds"] < 7 * 24 * 3600
        if kind == "CronJob":
            spec = doc["spec"]
            assert spec.get("concurrencyPolicy") == "Forbid"
            pod = spec["jobTemplate"]["spec"]["template"]["spec"]
            cmd = pod["containers"][0]["command"]
            assert cmd[:3] == ["kubectl", "create", "-f"], "the CronJob creates a RayJob"
            maps = {v["configMap"]["name"] for v in pod.get("volumes", []) if "configMap" in v}
            same_file = {d["metadata"]["name"]: d for d in _docs(path) if d.get("kind") == "ConfigMap"}
            assert maps and maps <= set(same_file), f"{path.name}: the RayJob template ConfigMap is missing"
            inner = yaml.safe_load(next(iter(same_file[next(iter(maps))]["data"].values())))
            assert inner["kind"] == "RayJob" and "generateName" in inner["metadata"]
            assert "pipelines.retrain" in inner["spec"]["entrypoint"]
            assert "--registry s3://" in inner["spec"]["entrypoint"]
            roles = [d for d in _docs(path) if d.get("kind") == "Role"]
            assert any("rayjobs" in r["resources"] and "create" in r["verbs"] for role in roles
                       for r in role["rules"]), f"{path.name}: the service account cannot create RayJobs"
            assert pod["serviceAccountName"] in {d["metadata"]["name"] for d in _docs(path)
                                                 if d.get("kind") == "ServiceAccount"}
    assert sorted(schedules) == ["CronJob", "RayCronJob"]


def test_operator_values_enable_raycronjob():
    values = yaml.safe_load((CLUSTER / "kuberay" / "operator-values.yaml").read_text())
    gates = {g["name"]: g["enabled"] for g in values["featureGates"]}
    assert gates.get("RayCronJob") is True


def test_runtime_env_is_valid_and_excludes_outputs():
    from ray.runtime_env import RuntimeEnv

    env = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    RuntimeEnv(**env)
    assert env["working_dir"] == "."
    for pattern in ("/.git/", "/runs/", "/results/", "/benchmarks/results/", "__pycache__/"):
        assert pattern in env["excludes"], pattern
    assert "RAY_AUTH_TOKEN" not in env.get("env_vars", {}) and "RAY_AUTH_MODE" not in env.get("env_vars", {})
    # The submit helper accepts it as is: working dir, merged excludes, the pinned pip list.
    built = submit.build_runtime_env(CLUSTER / "runtime_env.yaml", working_dir=str(ROOT))
    assert built["pip"] == env["pip"] and "/.git/" in built["excludes"]


def test_pins_agree_with_setup_cfg():
    required = _setup_requirements()
    exact = {n: r for n, r in required.items() if any(s.operator == "==" for s in r.specifier)}
    assert {"torch", "torchvision", "ray"} <= set(exact), "setup.cfg pins torch, torchvision and ray"
    for source, pins in _pin_sources().items():
        assert set(pins) == set(required), \
            f"{source}: pins {sorted(pins)} but setup.cfg requires {sorted(required)}"
        for name, pin in pins.items():
            want = required[name]
            (version,) = [s.version for s in pin.specifier]
            assert want.specifier.contains(Version(version), prereleases=True), \
                f"{source}: {pin} does not satisfy setup.cfg's {want}"
            if name in exact:
                assert str(pin.specifier) == str(want.specifier) and pin.extras == want.extras, \
                    f"{source}: {pin} != setup.cfg's {want}"
    ray_version = next(s.version for s in exact["ray"].specifier)
    assert SpecifierSet(_python_requires()).contains("3.11"), "the images are Python 3.11"
    images = [yaml.safe_load(p.read_text())["docker"][k] for p in LAUNCHERS for k in ("image", "head_image")]
    images.append(re.search(r"^FROM (\S+)", (CLUSTER / "Dockerfile").read_text(), re.M).group(1))
    for img in images:
        assert img.startswith(f"rayproject/ray:{ray_version}-py311"), f"{img}: not the image of ray=={ray_version}"
    for where, spec in _ray_cluster_specs():
        assert spec["rayVersion"] == ray_version, where


def _python_requires() -> str:
    cp = configparser.ConfigParser()
    cp.read(ROOT / "setup.cfg")
    return cp["options"]["python_requires"]


def _need(cfg: C.Config) -> tuple[int, int]:
    """(workers the run asks for at most, workers it must keep to go on) - pretraining and linear eval."""
    t = cfg.train
    most = max(t.num_workers, cfg.eval.linear.num_workers)
    return most, (t.min_workers or most)


@pytest.mark.parametrize("preset", TRAIN_PRESETS)
def test_gpu_capacity_fits_the_scaling_the_pipeline_asks_for(preset):
    cfg = C.load(preset)
    assert cfg.train.use_gpu, f"{preset}: the cluster sizing assumes GPU workers"
    cpw = cfg.train.cpus_per_worker
    most, keep = _need(cfg)
    strategy = getattr(cfg.train, "placement_strategy", "PACK")
    defs = _definitions()
    assert len(defs) >= 6
    for where, types, node_cap in defs:
        assert any(t.cpus - 1 >= cpw and t.gpus >= 1 for t in types), \
            f"{where}: no GPU node has {cpw} CPUs per worker plus one for Ray Data"
        total = sum(t.slots(cpw) * t.max_nodes for t in types)
        on_demand = sum(t.slots(cpw) * t.max_nodes for t in types if not t.spot)
        assert total >= most, f"{where}: at most {total} GPU workers fit, {preset} asks for {most}"
        assert on_demand >= keep, \
            f"{where}: on-demand capacity {on_demand} < the {keep} workers {preset} needs to survive spot loss"
        if strategy == "STRICT_PACK":
            assert any(t.slots(cpw) >= most for t in types), f"{where}: no single node holds {most} workers"
        if node_cap is not None:
            best = max(t.slots(cpw) for t in types)
            assert node_cap >= math.ceil(most / best), f"{where}: max_workers {node_cap} too small for {preset}"


def test_nothing_secret_in_cluster_files():
    secretish = re.compile(r"AKIA[0-9A-Z]{16}|PRIVATE KEY|aws_secret_access_key|ya29\.|ghp_[A-Za-z0-9]{20}")
    for path in [*YAML_FILES, CLUSTER / "Dockerfile", CLUSTER / "README.md"]:
        text = path.read_text()
        assert not secretish.search(text), f"{path}: looks like a credential"
    for path, doc in _all_docs():
        for env in _env_entries(doc):
            if env.get("name") in ("RAY_AUTH_TOKEN", "AWS_SECRET_ACCESS_KEY"):
                assert "value" not in env, f"{path.name}: {env['name']} has a literal value"


def _env_entries(node):
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "env" and isinstance(v, list):
                yield from (e for e in v if isinstance(e, dict))
            else:
                yield from _env_entries(v)
    elif isinstance(node, list):
        for v in node:
            yield from _env_entries(v)


def _readme_commands() -> list[str]:
    text = (CLUSTER / "README.md").read_text()
    blocks = re.findall(r"```(?:bash|sh)\n(.*?)```", text, re.S)
    lines = []
    for block in blocks:
        joined = re.sub(r"\\\n\s*", " ", block)
        lines += [ln.strip() for ln in joined.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    return lines


def test_readme_commands_name_real_files_and_valid_submits():
    lines = _readme_commands()
    text = (CLUSTER / "README.md").read_text()
    for needle in ("ray up cluster/aws.yaml", "ray up cluster/gcp.yaml", "ray dashboard", "port-forward",
                   "ray job submit --working-dir . -- python -m pipelines.pretrain_eval", "simsiam submit",
                   "pipelines.search", "retrain-cronjob.yaml", "RAY_AUTH_MODE=token", "RAY_AUTH_TOKEN"):
        assert needle in text, f"cluster/README.md lacks {needle!r}"
    for path in set(re.findall(r"\b((?:cluster|configs|tune_spaces)/[\w./-]+\.(?:yaml|md)|cluster/Dockerfile)",
                               text)):
        assert (ROOT / path).exists(), f"cluster/README.md names {path}, which does not exist"
    submits = [ln for ln in lines if ln.startswith("simsiam submit")]
    assert len(submits) >= 3
    for ln in submits:
        argv = shlex.split(ln.split(" #", 1)[0])[2:]
        i = argv.index("--")
        submit._parser("simsiam submit").parse_args(argv[:i])
        entry = submit.build_entrypoint(argv[i + 1:], ROOT)
        if entry.startswith("python -m pipelines."):
            _check_entrypoint(f"README: {ln}", entry)
    for ln in lines:
        if ln.startswith("ray job submit") and "pipelines." in ln:
            _check_entrypoint(f"README: {ln}", ln.split(" -- ", 1)[1])
