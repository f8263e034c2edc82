"""Reading a recipe: YAML, `--set` overrides, paths relative to the file, and errors that name file, line and key.

A recipe is YAML. Unknown keys, wrong types and missing files are errors that name the key, the file and the
line; nothing runs until the whole recipe is valid.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from tunewright.recipe.pipeline import Recipe, SearchConfig
from tunewright.recipe.section import section_of


class RecipeError(ValueError):
    """A recipe that cannot run; the message names the file, the line and the key."""


_RELATIVE_PATHS = (("data", "path"), ("monitor", "production_path"), ("monitor", "request_log"),
                   ("evaluate", "json_schema"))


def _resolve(value: Any, base: Path) -> Any:
    if isinstance(value, str) and not value.startswith("s3://") and not Path(value).expanduser().is_absolute():
        return str((base / value).resolve())
    return value


def _line_of(node: yaml.Node | None, loc: tuple[Any, ...]) -> int | None:
    """1-based line of the deepest YAML node on `loc` that exists."""
    line = None
    for key in loc:
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                if k.value == key:
                    line, node = k.start_mark.line + 1, v
                    break
            else:
                return line
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
            line = node.start_mark.line + 1
        else:
            return line
    return line


def _set_dotted(data: dict, dotted: str, raw: str) -> None:
    keys = dotted.split(".")
    target = data
    for key in keys[:-1]:
        target = target.setdefault(key, {})
        if not isinstance(target, dict):
            raise RecipeError(f"--set {dotted}={raw}: '{key}' is not a section")
    target[keys[-1]] = yaml.safe_load(raw)


def _read_mapping(path: Path, what: str, shape: str) -> tuple[Any, dict]:
    """A YAML file's node tree (for line numbers in errors) and its data, which must be a mapping."""
    if not path.is_file():
        raise RecipeError(f"{path}: {what} not found")
    text = path.read_text(encoding="utf-8")
    try:
        root = yaml.compose(text)
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: {shape}, got {type(data).__name__}")
    return root, data


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, override and validate a recipe; raise RecipeError naming file, line and key."""
    path = Path(path)
    root, data = _read_mapping(path, "recipe file", "a recipe is a mapping of sections")
    set_keys = set()
    for item in overrides or []:
        if "=" not in item:
            raise RecipeError(f"--set {item}: expected section.key=value")
        dotted, raw = item.split("=", 1)
        _set_dotted(data, dotted.strip(), raw)
        set_keys.add(tuple(dotted.strip().split(".")))
    base = path.resolve().parent
    for section, key in _RELATIVE_PATHS:
        if isinstance(data.get(section), dict) and key in data[section]:
            data[section][key] = _resolve(data[section][key], base)
    sources = data.get("data", {}).get("sources") if isinstance(data.get("data"), dict) else None
    for src in sources if isinstance(sources, list) else []:
        if isinstance(src, dict) and "path" in src:
            src["path"] = _resolve(src["path"], base)
    merge = data["model"].get("merge") if isinstance(data.get("model"), dict) else None
    if isinstance(merge, dict) and isinstance(merge.get("adapters"), list):
        merge["adapters"] = [a if str(a).startswith("models:/") else _resolve(a, base) for a in merge["adapters"]]
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(_describe(path, root, exc, set_keys)) from None


def load_space(path: str | Path) -> SearchConfig:
    """Read and validate a search space file (a `search` section on its own); errors name file, line and key."""
    path = Path(path)
    root, data = _read_mapping(path, "search space file", "a search space is a mapping (params, sampler, ...)")
    try:
        return SearchConfig.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(_describe(path, root, exc, set(), what="search space", model=SearchConfig)) from None


def _inner(annotation: Any, part: Any) -> Any:
    """The type one step below `annotation` at `part`: a field of a section, a mapping's value, a list's item."""
    annotation = section_of(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        field = annotation.model_fields.get(str(part))
        return field.annotation if field else None
    if get_origin(annotation) in (dict, list):
        return get_args(annotation)[-1]
    return None


def _describe(path: Path, root: yaml.Node | None, exc: ValidationError, set_keys: set, what: str = "recipe",
              model: type[BaseModel] | None = None) -> str:
    lines = [f"{path}: invalid {what} ({exc.error_count()} problem{'s' if exc.error_count() > 1 else ''})"]
    for err in exc.errors():
        loc = tuple(err["loc"])
        loc = loc[:-1] if loc[-1:] == ("[key]",) else loc  # a mapping's key that is wrong: name the key
        key = ".".join(str(p) for p in loc) or f"({what})"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
            parent: Any = model or Recipe
            for part in loc[:-1]:
                parent = _inner(parent, part)
            parent = section_of(parent)
            if isinstance(parent, type) and issubclass(parent, BaseModel):
                msg += f" (allowed: {', '.join(parent.model_fields)})"
        if any(loc[: len(s)] == s for s in set_keys):
            where = f"{path} (--set)"
        else:
            line = _line_of(root, loc)
            where = f"{path}:{line}" if line else str(path)
        lines.append(f"  {where}: {key}: {msg}")
    return "\n".join(lines)
