"""Spec layer: TOML loading, pydantic schema, cross-field rules and estimates (never imports torch)."""

from dsv4cli.spec.schema import Spec  # noqa: F401
