"""The configs that ship with bss-search, by name: ``--config smoke`` is this folder's ``smoke.yaml``.

This folder is ``configs/`` in a checkout and the package ``bss_model.configs`` once installed
(``pyproject.toml`` maps one to the other), so every command finds them without a checkout. Two kinds:
a *search* config (``base:``, ``space:``, ``tune:``, ``retrain:``) for ``bss-search``, and a *model*
config (a bss_model config: ``data:``, ``model:``, ``train:``, ``eval:``) for ``bss-train`` and
``bss-retrain --config``.
"""

from __future__ import annotations

from pathlib import Path

FOLDER = Path(__file__).resolve().parent
SEARCH, MODEL = "search", "model"
COMMANDS = {SEARCH: "bss-search", MODEL: "bss-train and bss-retrain --config"}


def names() -> list[str]:
    """The shipped configs' names (file stems), sorted."""
    return sorted(p.stem for p in FOLDER.glob("*.yaml"))


def path(name: str) -> Path:
    return FOLDER / f"{name}.yaml"


MODEL_SECTIONS = ("data", "model", "train", "eval")  # bss_model.config.Config's


def kind(name: str) -> str:
    """``model`` for a config of bss_model's sections only, else ``search`` (it nests one under ``base:``)."""
    import yaml

    data = yaml.safe_load(path(name).read_text(encoding="utf-8")) or {}
    return MODEL if set(data) <= set(MODEL_SECTIONS) else SEARCH


def summary(name: str, width: int = 100) -> str:
    """The opening comment's first sentence (what the config is for), cut to ``width`` characters."""
    words: list[str] = []
    for line in path(name).read_text(encoding="utf-8").splitlines():
        text = line.lstrip("#").strip()
        if not line.startswith("#") or not text:
            break
        words += text.split()
        if text.endswith(".") or ". " in text:
            break
    first = " ".join(words).split(". ", 1)[0].rstrip(".")
    return first if len(first) <= width else first[: width - 1].rstrip() + "…"
