"""MkDocs hook: every repository file, folder or module that the documentation names must exist.

``mkdocs build --strict`` already fails on a broken link between documentation pages (and, with the ``validation``
settings of ``mkdocs.yml``, on a broken anchor). Source files are not documentation pages, so the pages name them in
code (`` `lightning_dit_parallel/app/writer.py` ``, ``python bench/writer.py``) instead of linking them. This hook
checks those names, in every page and in ``README.md`` (whose links to ``docs/`` pages are checked too):

* a path that starts with a top-level folder of the repository (``lightning_dit_parallel/``, ``tests/``,
  ``bench/``, ``examples/``, ``conf/``, ``docs/``, ``.ci/``) must exist (``*`` is a glob; a ``:name`` suffix, as in
  ``examples/own_dit.py:check_plan_factory``, is dropped);
* a dotted name ``lightning_dit_parallel.a.b`` must be a module of the package, or a module followed by a name that
  its source defines or imports (read as text; nothing is imported).

and every name that ``lightning_dit_parallel.__all__`` exports must be rendered by a page under ``docs/reference/``
(``::: lightning_dit_parallel.NAME``). Every missing name is logged with its page, and the build then fails with the
list.
"""

from __future__ import annotations

import ast
import glob
import logging
import re
from pathlib import Path

from mkdocs.exceptions import PluginError

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = "lightning_dit_parallel"
TOP_LEVEL = (PACKAGE, "tests", "bench", "examples", "conf", "docs", ".ci")

# a repository path: a top-level folder, then path characters (not preceded by a path character or a dot,
# so URLs and absolute paths such as /models/examples/... are not taken)
_PATH = re.compile(r"(?<![\w./-])((?:%s)/[\w.*/-]*)" % "|".join(re.escape(t) for t in TOP_LEVEL))
_MODULE = re.compile(r"(?<![\w./])%s(?:\.\w+)+" % PACKAGE)
_README_LINK = re.compile(r"\]\(([^)\s]+)\)")

log = logging.getLogger("mkdocs.hooks.check_paths")
_missing: list[str] = []


def missing_paths(text: str) -> list[str]:
    """The repository paths named in ``text`` that do not exist."""
    missing = []
    for match in _PATH.finditer(text):
        path = match.group(1).rstrip(".")
        if "*" in path:
            found = bool(glob.glob(str(ROOT / path)))
        else:
            found = (ROOT / path).exists()
        if not found:
            missing.append(path)
    return missing


def _module_file(parts: list[str]) -> Path | None:
    base = ROOT.joinpath(*parts)
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def missing_modules(text: str) -> list[str]:
    """The dotted ``lightning_dit_parallel.…`` names in ``text`` that are neither a module nor a module's name."""
    missing = []
    for match in _MODULE.finditer(text):
        parts = match.group(0).split(".")
        for i in range(len(parts), 0, -1):
            source = _module_file(parts[:i])
            if source is not None:
                break
        if source is None:
            missing.append(match.group(0))
            continue
        rest = parts[i:]
        if rest and not re.search(rf"\b{re.escape(rest[0])}\b", source.read_text(encoding="utf-8")):
            missing.append(match.group(0))
    return missing


def _check(text: str, where: str) -> None:
    for name in missing_paths(text) + missing_modules(text):
        message = f"{where} names {name!r}, which is not in the repository"
        log.warning(message)
        _missing.append(message)


def on_pre_build(config, **kwargs) -> None:
    """Check README.md: its repository paths, its modules and its relative links (docs pages, files)."""
    _missing.clear()
    readme = ROOT / "README.md"
    if not readme.is_file():
        return
    text = readme.read_text(encoding="utf-8")
    _check(text, "README.md")
    for target in _README_LINK.findall(text):
        if "://" in target or target.startswith(("#", "mailto:")):
            continue
        path = target.split("#", 1)[0]
        if _PATH.fullmatch(path):
            continue  # a repository path: checked above with the others
        if path and not (ROOT / path).exists():
            message = f"README.md links to {path!r}, which is not in the repository"
            log.warning(message)
            _missing.append(message)


def undocumented_exports(reference: Path) -> list[str]:
    """The names of ``lightning_dit_parallel.__all__`` that no page under ``reference`` renders with
    ``::: lightning_dit_parallel.NAME``."""
    tree = ast.parse((ROOT / PACKAGE / "__init__.py").read_text(encoding="utf-8"))
    exported: list[str] = []
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets):
            exported = list(ast.literal_eval(node.value))
    rendered = set()
    for page in reference.glob("*.md"):
        rendered.update(re.findall(rf"^::: {PACKAGE}\.(\w+)\s*$", page.read_text(encoding="utf-8"), re.M))
    return [name for name in exported if name not in rendered]


def on_files(files, config, **kwargs):
    """Check that the API reference renders every name the package exports."""
    for name in undocumented_exports(Path(config["docs_dir"]) / "reference"):
        message = f"lightning_dit_parallel.__all__ exports {name!r}, which no page under docs/reference/ renders"
        log.warning(message)
        _missing.append(message)
    return files


def on_page_markdown(markdown: str, page, **kwargs) -> str:
    """Check one page's repository paths and modules."""
    _check(markdown, f"docs/{page.file.src_path}")
    return markdown


def on_post_build(config, **kwargs) -> None:
    """Fail the build when a page or the README named something the repository does not have."""
    if _missing:
        raise PluginError(
            "Names the repository does not have, or exports the API reference leaves out:\n  " + "\n  ".join(_missing)
        )
