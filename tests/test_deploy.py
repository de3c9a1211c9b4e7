"""deploy/: the KubeRay manifests validated offline against KubeRay v1.7.0's own CRD schemas, strictly -- an
unknown or misspelled field anywhere (pod templates included) is refused, as `kubectl --validate=strict`
would -- and checked against the project: the entrypoint's files, the pinned Ray version, an explicit CUDA
tag, GPUs requested and limited, credentials from a Secret, the cluster deleted after the job.

The CRDs are in ``<repo>/../shared/kuberay/`` (as in CI), else beside $BSS_DATA_DIR.
"""

from __future__ import annotations

import copy
import functools
import os
import re
import shlex
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
MANIFESTS = {
    "rayjob.yaml": ("RayJob", "ray.io_rayjobs.yaml"),
    "raycluster.yaml": ("RayCluster", "ray.io_rayclusters.yaml"),
}


def kuberay_dir() -> Path:
    candidates = [REPO.parent / "shared" / "kuberay"]
    if os.environ.get("BSS_DATA_DIR"):
        candidates.append(Path(os.environ["BSS_DATA_DIR"]).resolve().parent / "kuberay")
    for path in candidates:
        if (path / "ray.io_rayjobs.yaml").is_file():
            return path
    pytest.fail(f"KubeRay CRDs not found in {' or '.join(map(str, candidates))}: copy KubeRay v1.7.0's", False)


def strict(schema: Any) -> Any:
    """The CRD's structural schema, with every object that lists its properties closed to others.

    Kubernetes prunes unknown fields instead of refusing them; a strict client refuses them. Objects that
    declare ``additionalProperties`` (maps) or ``x-kubernetes-preserve-unknown-fields`` stay open.
    """
    if isinstance(schema, dict):
        out = {k: strict(v) for k, v in schema.items()}
        if (
            "properties" in out
            and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [strict(v) for v in schema]
    return schema


@functools.cache
def validator(crd_file: str) -> Any:
    import jsonschema

    crd = yaml.load((kuberay_dir() / crd_file).read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return jsonschema.Draft7Validator(strict(version["schema"]["openAPIV3Schema"]))


def errors(doc: dict[str, Any], crd_file: str) -> list[str]:
    return sorted(f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator(crd_file).iter_errors(doc))


def load(name: str) -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / name).read_text())


def ray_pin() -> str:
    (pin,) = re.findall(r"^ray==(\S+)$", (REPO / "constraints.txt").read_text(), re.M)
    return pin


def cluster_spec(name: str) -> dict[str, Any]:
    doc = load(name)
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


def pod_templates(name: str) -> dict[str, dict[str, Any]]:
    spec = cluster_spec(name)
    out = {"head": spec["headGroupSpec"]["template"]}
    out.update({g["groupName"]: g["template"] for g in spec["workerGroupSpecs"]})
    return out


# --------------------------------------------------------------------------------------
# The schema, strictly


@pytest.mark.parametrize("name", list(MANIFESTS))
def test_manifest_is_valid_against_the_kuberay_crd(name: str) -> None:
    kind, crd = MANIFESTS[name]
    doc = load(name)
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == kind
    assert errors(doc, crd) == []


def _set(doc: dict[str, Any], path: str, value: Any, rename_to: str | None = None) -> dict[str, Any]:
    """A copy of ``doc`` with the field at the dotted ``path`` set to ``value``, or renamed."""
    doc = copy.deepcopy(doc)
    *parents, last = path.split(".")
    node: Any = doc
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    if rename_to is not None:
        node[rename_to] = node.pop(last)
    else:
        node[last] = value
    return doc


HEAD = "spec.rayClusterSpec.headGroupSpec.template.spec.containers.0"
BROKEN = {
    # (path, value or None, new name or None, what the error must name)
    "misspelled-top-field": ("spec.shutdownAfterJobFinishes", None, "shutdownAfterJobFinish", "shutdownAfterJobFinish"),
    "misspelled-in-pod-template": (f"{HEAD}.resources", None, "resource", "resource"),
    "wrong-type-ttl": ("spec.ttlSecondsAfterFinished", "600", None, "'600' is not of type 'integer'"),
    "wrong-type-replicas": ("spec.rayClusterSpec.workerGroupSpecs.0.replicas", "four", None, "'four'"),
    "wrong-type-start-param": ("spec.rayClusterSpec.headGroupSpec.rayStartParams.num-cpus", 0, None, "'string'"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_a_misspelled_field_or_a_wrong_type_is_refused(case: str) -> None:
    """The negative control: the same manifest with one mistake fails, and the error names it."""
    path, value, rename, expected = BROKEN[case]
    found = errors(_set(load("rayjob.yaml"), path, value, rename), "ray.io_rayjobs.yaml")
    assert found and any(expected in e for e in found), found


def test_a_field_kubernetes_would_prune_is_refused_only_by_the_strict_schema() -> None:
    """Why the schema is made strict: as published, the CRD lets a misspelled field through."""
    import jsonschema

    crd = yaml.load(
        (kuberay_dir() / "ray.io_rayjobs.yaml").read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    )
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    doc = _set(load("rayjob.yaml"), "spec.shutdownAfterJobFinishes", None, "shutdownAfterJobFinish")
    assert not list(jsonschema.Draft7Validator(version["schema"]["openAPIV3Schema"]).iter_errors(doc))
    assert errors(doc, "ray.io_rayjobs.yaml")


# --------------------------------------------------------------------------------------
# The manifests against the project


def test_rayjob_runs_the_gpu_search_from_the_image_with_s3_storage() -> None:
    spec = load("rayjob.yaml")["spec"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["python", "search/run.py"] and (REPO / argv[1]).is_file()
    config = argv[argv.index("--config") + 1]
    assert config == "configs/search.yaml" and (REPO / config).is_file()
    assert argv[argv.index("--storage-path") + 1].startswith("s3://")
    assert "--name" in argv
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert runtime_env == {"working_dir": "/home/ray/bss-search"}
    assert "WORKDIR /home/ray/bss-search" in (DEPLOY / "Containerfile").read_text()
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0


@pytest.mark.parametrize("name", list(MANIFESTS))
def test_ray_version_and_image_are_pinned_with_an_explicit_cuda_tag(name: str) -> None:
    pin = ray_pin()
    spec = cluster_spec(name)
    assert spec["rayVersion"] == pin
    base = re.search(r"^ARG BASE_IMAGE=(\S+)$", (DEPLOY / "Containerfile").read_text(), re.M).group(1)
    base_tag = re.fullmatch(rf"rayproject/ray:{re.escape(pin)}-py3\d+-(cu\d+)", base)
    assert base_tag, f"{base}: Ray {pin} with an explicit CUDA tag"
    torch_index = re.search(r"^ARG TORCH_INDEX=\S+/(cu\d+)$", (DEPLOY / "Containerfile").read_text(), re.M)
    assert torch_index and torch_index.group(1) == base_tag.group(1), "torch built for the image's CUDA"
    for group, template in pod_templates(name).items():
        for container in template["spec"]["containers"]:
            image = container["image"]
            assert f"-ray{pin}-" in image and image.endswith(f"-{base_tag.group(1)}"), (group, image)
            assert "-gpu" not in image and "ray-ml" not in image and ":latest" not in image, (group, image)


@pytest.mark.parametrize("name", list(MANIFESTS))
def test_gpu_workers_request_and_limit_gpus_and_credentials_come_from_a_secret(name: str) -> None:
    templates = pod_templates(name)
    assert "gpu" in templates
    (worker,) = templates["gpu"]["spec"]["containers"]
    requests, limits = worker["resources"]["requests"], worker["resources"]["limits"]
    assert int(requests["nvidia.com/gpu"]) >= 1 and requests["nvidia.com/gpu"] == limits["nvidia.com/gpu"]
    assert "nvidia.com/gpu" not in templates["head"]["spec"]["containers"][0]["resources"]["limits"]
    for group, template in templates.items():
        for container in template["spec"]["containers"]:
            secrets = [e["secretRef"]["name"] for e in container.get("envFrom", []) if "secretRef" in e]
            assert secrets == ["bss-s3"], (group, container["name"])
            literal = {e["name"] for e in container.get("env", []) if "value" in e}
            assert not literal & {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}, "credentials in the manifest"


def test_containerfile_installs_the_project_with_its_pins() -> None:
    text = (DEPLOY / "Containerfile").read_text()
    # The search extra: `pip install .` alone is the model only (no Ray Tune, Optuna or TensorBoard).
    assert "-c /tmp/constraints.txt '.[search]'" in text and "grep -v '^torch==' constraints.txt" in text
    assert "sed -n 's/^torch==//p' constraints.txt" in text, "torch at the pinned version, CUDA build"
    for path in ("bss_model", "search", "configs", "pyproject.toml", "constraints.txt", "LICENSE"):
        assert re.search(rf"^COPY .*\b{re.escape(path)}\b", text, re.M), path


def test_the_offline_build_feeds_the_containerfile_only_arguments_it_declares() -> None:
    """deploy/offline-image.sh (run by hand: it needs root, podman and a registry) builds deploy/Containerfile
    unchanged on a stand-in of Ray's image. A build argument the Containerfile does not declare is only a
    warning to podman, so a renamed ARG would silently build the CUDA default; the stand-in must provide
    the user and group the Containerfile's COPY --chown names."""
    script = (DEPLOY / "offline-image.sh").read_text()
    assert subprocess.run(["bash", "-n", str(DEPLOY / "offline-image.sh")], capture_output=True).returncode == 0
    declared = set(re.findall(r"^ARG (\w+)", (DEPLOY / "Containerfile").read_text(), re.M))
    build = script[script.index("-f deploy/Containerfile") :].split("-t ", 1)[0]
    passed = set(re.findall(r"--build-arg (\w+)=", build))
    assert passed == {"BASE_IMAGE", "TORCH_INDEX"} and passed <= declared, (passed, declared)
    standin = (DEPLOY / "ray-standin.Containerfile").read_text()
    owners = set(re.findall(r"^COPY --chown=(\S+) ", (DEPLOY / "Containerfile").read_text(), re.M))
    assert owners == {"ray:users"} and "--uid 1000 --gid users" in standin and "\nUSER ray\n" in standin
    assert "ray[default,tune]" in standin and "-c /tmp/constraints.txt" in standin, "Ray at the pinned version"
