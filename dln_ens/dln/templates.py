"""DLN prompt templates: YAML files of versioned Jinja2 templates.

Each ``<name>.yaml`` (shipped in ``dln_ens/templates/`` or in a user folder) maps a version to
a template::

    v1:
      description: "..."
      stop: ["\\n"]                      # stop strings for generation after the rendered text
      message_alternatives: [...]        # optional (the prompt proposer rotates through them)
      template: |-
        {{ prompt }}

        Input: {{ input }}
        Answer:

Templates are named ``name`` (the version the config selects, ``DLNConfig.templates``) or
``name:version``. Rendering is exact: no stripping, a missing variable is an error.
Templates render in Jinja2's immutable sandbox: a template (a user folder named in a config
is as untrusted as the config) cannot reach Python internals, run commands or mutate data.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import jinja2
import jinja2.sandbox
import yaml
from dln_ens.errors import UserError

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "templates"
_ENV = jinja2.sandbox.ImmutableSandboxedEnvironment(undefined=jinja2.StrictUndefined,
                                                   keep_trailing_newline=True, autoescape=False)


class TemplateError(UserError, ValueError):
    """A template file or lookup problem, naming the file/template and the fix."""


@dataclass(frozen=True)
class DLNTemplate:
    name: str
    version: str
    template: str
    stop: tuple[str, ...] = ()
    message_alternatives: tuple[str, ...] = ()
    description: str = ""
    source: str = ""
    _compiled: jinja2.Template | None = field(default=None, compare=False, repr=False)

    def render(self, **fields) -> str:
        try:
            return self._compiled.render(**fields)
        except jinja2.UndefinedError as e:
            raise TemplateError(f"template {self.name}:{self.version} ({self.source}): {e}; "
                                f"pass it when rendering") from None
        except jinja2.exceptions.SecurityError as e:
            raise TemplateError(f"template {self.name}:{self.version} ({self.source}) tried an unsafe "
                                f"operation ({e}); templates render in a sandbox: use only the fields "
                                f"passed to them") from None

    @property
    def key(self) -> str:
        return f"{self.name}:{self.version}"


_KNOWN_KEYS = {"template", "stop", "message_alternatives", "description"}


def _read_file(path: Path) -> dict[str, DLNTemplate]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise TemplateError(f"{path}: invalid YAML: {e}") from None
    if not isinstance(data, dict) or not data:
        raise TemplateError(f"{path}: expected a mapping of versions (v1: {{template: ...}})")
    out = {}
    for version, spec in data.items():
        where = f"{path}: version {version!r}"
        if not isinstance(version, str) or not version.startswith("v"):
            raise TemplateError(f"{where}: versions are named like 'v1', 'v1.1'")
        if not isinstance(spec, dict) or not isinstance(spec.get("template"), str):
            raise TemplateError(f"{where}: needs a 'template' string")
        unknown = set(spec) - _KNOWN_KEYS
        if unknown:
            raise TemplateError(f"{where}: unknown keys {sorted(unknown)}; known: {sorted(_KNOWN_KEYS)}")
        for key in ("stop", "message_alternatives"):
            value = spec.get(key, [])
            if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
                raise TemplateError(f"{where}: '{key}' must be a list of strings")
        try:
            compiled = _ENV.from_string(spec["template"])
        except jinja2.TemplateSyntaxError as e:
            raise TemplateError(f"{where}: Jinja2 syntax error line {e.lineno}: {e.message}") from None
        out[version] = DLNTemplate(
            name=path.stem, version=version, template=spec["template"],
            stop=tuple(spec.get("stop", [])),
            message_alternatives=tuple(spec.get("message_alternatives", [])),
            description=spec.get("description", ""), source=str(path), _compiled=compiled)
    return out


class TemplateLibrary:
    """All templates of the package plus an optional user folder.

    A user folder may add templates or new versions of packaged ones; redefining an existing
    (name, version) is an error, so a packaged format is never replaced by accident."""

    def __init__(self, default_version: str = "v1", template_dir: str | Path | None = None):
        self.default_version = default_version
        self._by_name: dict[str, dict[str, DLNTemplate]] = {}
        for path in sorted(PACKAGE_DIR.glob("*.yaml")):
            self._by_name[path.stem] = _read_file(path)
        if template_dir is not None:
            folder = Path(template_dir)
            if not folder.is_dir():
                raise TemplateError(f"template_dir {folder} is not a directory; create it or set "
                                    f"\"template_dir\": null")
            for path in sorted(folder.glob("*.yaml")):
                versions = self._by_name.setdefault(path.stem, {})
                for version, tpl in _read_file(path).items():
                    if version in versions:
                        raise TemplateError(f"{path}: {path.stem}:{version} is already defined in "
                                            f"{versions[version].source}; give your version a new "
                                            f"name (e.g. {version}-mine) and select it")
                    versions[version] = tpl

    def names(self) -> dict[str, list[str]]:
        return {n: sorted(v) for n, v in sorted(self._by_name.items())}

    def get(self, spec: str) -> DLNTemplate:
        """``name`` (the library's default version) or ``name:version``."""
        name, _, version = spec.partition(":")
        version = version or self.default_version
        if name not in self._by_name:
            raise TemplateError(f"unknown template {name!r}; known: {', '.join(self._by_name)}")
        versions = self._by_name[name]
        if version not in versions:
            raise TemplateError(f"template {name!r} has no version {version!r}; available: "
                                f"{', '.join(sorted(versions))}")
        return versions[version]


def load_template(spec: str, version: str = "v1", template_dir: str | Path | None = None) -> DLNTemplate:
    return TemplateLibrary(version, template_dir).get(spec)
