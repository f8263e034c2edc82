"""What every recipe section shares: unknown keys are errors, and a validated section never changes."""

from __future__ import annotations

from types import UnionType
from typing import Any, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def section_of(annotation: Any) -> Any:
    """The section class of an optional section (`X | None`); other annotations as they are."""
    if get_origin(annotation) in (Union, UnionType):
        sections = [a for a in get_args(annotation) if isinstance(a, type) and issubclass(a, BaseModel)]
        return sections[0] if sections else annotation
    return annotation
