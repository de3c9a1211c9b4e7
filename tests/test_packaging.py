"""The package as PyPI would ship it: the sdist, the wheel built from it, and the wheel installed outside the checkout.

One build (module fixture) serves every test: ``python -m build`` makes the sdist from a copy of the checkout's
files, then the wheel from the unpacked sdist (so a file the sdist lacks is missing from the wheel too). The wheel
goes into fresh virtual environments in a temp folder, away from the checkout:

- ``full``: the wheel, with the project venv's third-party packages visible through a ``.pth`` line (nothing is
  reinstalled), but not the project's editable install: its finder's ``.pth`` is not processed there, so the
  ``bss_model`` and ``search`` that run are the wheel's, as the test checks by their ``__file__``;
- ``base``: the wheel with only what ``pip install bss-search`` brings (the closure of its requirements, linked
  one by one from the project venv): the inference install, without Ray, Optuna or TensorBoard.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from email.message import Message
from email.parser import Parser
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parent.parent
SITE = Path(sysconfig.get_paths()["purelib"])  # the project venv's site-packages
CONFIGS = sorted(p.name for p in (REPO / "configs").glob("*.yaml"))


def _sh(args: list[str | Path], cwd: Path, env: dict[str, str] | None = None, timeout: float = 180) -> str:
    proc = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{args} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def _clean_env(**extra: str) -> dict[str, str]:
    """The environment of a user's shell: no PYTHONPATH (nothing of the checkout on sys.path), no venv."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.update(extra)
    return env


def _venv(root: Path, wheel: Path, site_dirs: list[Path]) -> Path:
    """A fresh venv at ``root`` with ``wheel`` installed (no dependencies) and ``site_dirs`` on its path."""
    _sh([sys.executable, "-m", "venv", "--without-pip", root], cwd=root.parent)
    # pip of the project venv, installing into the new interpreter: no pip (or index) needed there.
    _sh([sys.executable, "-m", "pip", "--python", root / "bin" / "python", "install", "-q", "--no-deps", "--no-index",
         wheel], cwd=root.parent)  # fmt: skip
    purelib = _sh([root / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                  cwd=root.parent).strip()  # fmt: skip
    Path(purelib, "_deps.pth").write_text("".join(f"{d}\n" for d in site_dirs))
    return root


def _base_closure() -> set[str]:
    """The distributions ``pip install bss-search`` brings: its requirements without extras, recursively."""
    seen: set[str] = set()
    todo = list(metadata.requires("bss-search") or [])
    while todo:
        req = Requirement(todo.pop())
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        name = canonicalize_name(req.name)
        if name in seen:
            continue
        seen.add(name)
        todo += metadata.requires(req.name) or []
    return seen


def _link_farm(folder: Path, dists: set[str]) -> Path:
    """A folder with links to just ``dists``' top-level modules and metadata in the project venv."""
    folder.mkdir()
    for name in dists:
        dist = metadata.distribution(name)
        tops = {Path(f).parts[0] for f in dist.files or [] if not str(f).startswith("..")}
        for top in tops:
            src = SITE / top
            if src.exists() and not (folder / top).exists() and not top.endswith(".pth"):
                (folder / top).symlink_to(src)
    return folder


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("pkg")
    src = tmp / "src"
    # The files a fresh clone has (tracked, or new and not ignored): never the venv, results or build output.
    files = _sh(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO).split("\n")
    for rel in filter(None, files):
        if (REPO / rel).is_file():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, src / rel)
    # No build isolation: setuptools comes from the dev extra, so the build needs no index.
    _sh([sys.executable, "-m", "build", "--no-isolation", "--outdir", tmp / "dist", src], cwd=tmp)
    (sdist,) = (tmp / "dist").glob("*.tar.gz")
    (wheel,) = (tmp / "dist").glob("*.whl")
    # bss-search's own distribution (the editable install) stays out of both: what runs is the wheel.
    farm = _link_farm(tmp / "base-deps", _base_closure())
    return {
        "tmp": tmp,
        "sdist": sdist,
        "wheel": wheel,
        "full": _venv(tmp / "full", wheel, [SITE]),
        "base": _venv(tmp / "base", wheel, [farm]),
        "outside": (tmp / "elsewhere").resolve(),
    }


def _names(archive: Path) -> list[str]:
    if archive.suffix == ".whl":
        return zipfile.ZipFile(archive).namelist()
    with tarfile.open(archive) as tar:
        return [m.name.split("/", 1)[1] for m in tar.getmembers() if "/" in m.name]


def _wheel_metadata(wheel: Path) -> Message:
    with zipfile.ZipFile(wheel) as zf:
        (meta,) = [n for n in zf.namelist() if n.endswith(".dist-info/METADATA")]
        return Parser().parsestr(zf.read(meta).decode())


def test_the_wheel_and_the_sdist_ship_the_license_configs_and_py_typed(built: dict[str, Path]) -> None:
    wheel, sdist = _names(built["wheel"]), _names(built["sdist"])
    assert any(re.fullmatch(r"bss_search-[^/]+\.dist-info/licenses/LICENSE", n) for n in wheel), wheel
    assert "LICENSE" in sdist
    assert {"bss_model/py.typed", "search/py.typed"} <= set(wheel)
    assert {f"bss_model/configs/{c}" for c in CONFIGS} <= set(wheel)
    assert {f"configs/{c}" for c in CONFIGS} <= set(sdist)
    meta = _wheel_metadata(built["wheel"])
    import bss_model

    assert meta["Version"] == bss_model.__version__ and meta["License-Expression"] == "MIT"
    urls = dict(u.split(", ", 1) for u in meta.get_all("Project-URL"))
    assert {"Homepage", "Repository", "Issues"} <= set(urls)
    classifiers = meta.get_all("Classifier")
    assert "Typing :: Typed" in classifiers and "Programming Language :: Python :: 3.11" in classifiers


def test_the_version_is_written_once() -> None:
    pyproject = (REPO / "pyproject.toml").read_text()
    assert not re.search(r'(?m)^version\s*=\s*"', pyproject), "pyproject.toml reads bss_model.__version__"
    assert 'dynamic = ["version"]' in pyproject
    assert 'version = { attr = "bss_model.__version__" }' in pyproject
    assert re.findall(r"\b\d+\.\d+\.\d+\b", (REPO / "bss_model" / "__init__.py").read_text()) == [
        __import__("bss_model").__version__
    ]


def test_pip_install_is_inference_only_and_the_extras_add_the_rest(built: dict[str, Path]) -> None:
    meta = _wheel_metadata(built["wheel"])
    base, extras = [], {}
    for line in meta.get_all("Requires-Dist"):
        req = Requirement(line)
        extra = re.search(r'extra == "([^"]+)"', str(req.marker)) if req.marker else None
        (extras.setdefault(extra.group(1), []) if extra else base).append(canonicalize_name(req.name))
    assert sorted(base) == ["numpy", "pillow", "pyyaml", "torch"]
    assert {"ray", "optuna", "optuna-dashboard", "tensorboard"} <= set(extras["search"])
    assert extras["mlflow"] == ["mlflow-skinny"] and extras["wandb"] == ["wandb"]
    assert extras["postgresql"] == ["psycopg"]
    assert extras["all"] == ["bss-search"] and extras["dev"][0] == "bss-search"  # [all]: every extra, [dev]: + tools
    # What `make setup` (the README's commands, .ci/run) installs: the dev extra, hence everything.
    assert "-e '.[dev]'" in (REPO / "Makefile").read_text()
    import importlib.util

    for module in ("ray", "optuna", "tensorboard", "mlflow", "wandb", "psycopg", "flask_cors", "huey", "build"):
        assert importlib.util.find_spec(module) is not None, f"make setup did not install {module}"


def test_the_installed_wheel_runs_outside_the_checkout(built: dict[str, Path]) -> None:
    """``bss-search --config smoke`` (a shipped config, by name) and ``bss-separate`` from the wheel alone."""
    full, cwd = built["full"], built["outside"]
    cwd.mkdir(exist_ok=True)
    env = _clean_env()
    code = (
        "import json, bss_model, search, bss_model.configs as c; print(json.dumps([bss_model.__file__, "
        "search.__file__, str(c.FOLDER)]))"
    )
    where = json.loads(_sh([full / "bin" / "python", "-c", code], cwd, env))
    for path in where:
        assert Path(path).resolve().is_relative_to(full.resolve()), where  # the wheel's, not the checkout's
    out = _sh([full / "bin" / "bss-search", "--config", "smoke", "--help"], cwd, env)
    assert out.startswith("usage: bss-search ") and "smoke" in out
    out = _sh([full / "bin" / "bss-separate", "--help"], cwd, env)
    assert out.startswith("usage: bss-separate ")
    # The shipped config is found and loaded from the wheel (--print-config: nothing runs, nothing is written).
    import yaml

    printed = yaml.safe_load(_sh([full / "bin" / "bss-search", "--config", "smoke", "--print-config",
                                  "tune.num_samples=3"], cwd, env))  # fmt: skip
    assert printed["tune"]["name"] == "smoke" and printed["tune"]["num_samples"] == 3
    assert list(cwd.iterdir()) == []
    import bss_model

    for script in ("bss-search", "bss-separate"):  # (every command's --version: tests/test_cli.py)
        assert (
            _sh([full / "bin" / script, "--version"], cwd, env).strip()
            == f"{script} (bss-search) {bss_model.__version__}"
        )


def test_the_inference_install_separates_and_names_the_missing_extra(built: dict[str, Path], data_dir: Path) -> None:
    """Without the search extra: bss-train (no TensorBoard) and bss-separate work; bss-search says what to install."""
    base, cwd = built["base"], built["outside"] / "base"
    cwd.mkdir(parents=True, exist_ok=True)
    env = _clean_env(BSS_DATA_DIR=str(data_dir))
    py = base / "bin" / "python"
    missing = _sh([py, "-c", "import importlib.util as u; print([m for m in ('ray', 'optuna', 'tensorboard', "
                   "'matplotlib', 'tqdm') if u.find_spec(m)])"], cwd, env)  # fmt: skip
    assert missing.strip() == "[]"
    train = [base / "bin" / "bss-train", "--config", "seed", "--out", "runs", "model.variant=tiny",
             "train.tensorboard=false", "train.epochs=1", "train.samples_per_epoch=64", "data.val_pairs=64",
             "train.device=cpu", "train.threads=1", "train.precision=fp32"]  # fmt: skip
    result = json.loads(_sh(train, cwd, env).strip().splitlines()[-1])
    assert result["status"] == "completed"
    from PIL import Image

    Image.new("L", (28, 28), 128).save(cwd / "mix.png")
    _sh([base / "bin" / "bss-separate", "--checkpoint", result["run_dir"], "mix.png", "--out", "sep"], cwd, env)
    assert sorted(p.name for p in (cwd / "sep").iterdir()) == ["mix.digit.png", "mix.fashion.png", "panel.png"]
    # (bss-train's line for its TensorBoard logging without the extra: tests/test_cli.py)
    proc = subprocess.run([str(base / "bin" / "bss-search"), "--config", "smoke"], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert (
        lines[0].startswith("error: bss-search needs the 'search' extra")
        and "pip install 'bss-search[search]'" in lines[0]
    )


def _takes(module: str, func: str, param: str) -> bool:
    import importlib
    import inspect

    target = importlib.import_module(module)
    for part in func.split("."):
        target = getattr(target, part)
    return param in inspect.signature(target).parameters


# The APIs that set the declared floors: (distribution, the release the API needs, the API as the code writes it,
# a module of ours that calls it, a check that the installed release has it). torch.OutOfMemoryError first appeared
# in torch 2.5 (on 2.4 the out-of-memory handlers themselves failed with an AttributeError).
FLOOR_APIS = [
    ("torch", "2.5", "torch.OutOfMemoryError", "bss_model/train.py",
     lambda: issubclass(__import__("torch").OutOfMemoryError, RuntimeError)),
    ("torch", "2.5", "torch.cuda.is_bf16_supported(including_emulation=False)", "bss_model/runtime.py",
     lambda: _takes("torch", "cuda.is_bf16_supported", "including_emulation")),
    ("pillow", "10.1", "ImageFont.load_default(size=", "bss_model/viz.py",
     lambda: _takes("PIL.ImageFont", "load_default", "size")),
]  # fmt: skip


def _floors() -> dict[str, str]:
    text = (REPO / "pyproject.toml").read_text()
    deps = text[text.index("dependencies = [") : text.index("[project.optional-dependencies]")]
    return {canonicalize_name(m[0]): m[1] for m in re.findall(r'"([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?>=([0-9.]+)"', deps)}


@pytest.mark.parametrize(("dist", "needs", "api", "where", "present"), FLOOR_APIS, ids=[a[2] for a in FLOOR_APIS])
def test_the_floors_cover_the_apis_the_code_uses(dist: str, needs: str, api: str, where: str, present) -> None:  # noqa: ANN001
    from packaging.version import Version

    floor = _floors()[dist]
    assert Version(floor) >= Version(needs), f"{dist}>={floor} is declared, but {where} calls {api} (needs {needs})"
    assert api in (REPO / where).read_text(), f"{where} no longer calls {api}: drop or update this floor's reason"
    assert present(), f"the installed {dist} lacks {api}"
