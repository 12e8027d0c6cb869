"""docs/spec.md is generated from the schema and must match it; it documents every key."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from dsv4cli.cli import app
from dsv4cli.spec.docs import schema_markdown
from dsv4cli.spec.schema import Spec

REPO = Path(__file__).resolve().parents[1]


def test_committed_spec_doc_matches_the_generator():
    committed = (REPO / "docs" / "spec.md").read_text()
    assert committed == schema_markdown(), "docs/spec.md is stale: run `dsv4 schema --markdown > docs/spec.md`"


def test_schema_markdown_command_prints_the_page():
    result = CliRunner(env={"COLUMNS": "200", "NO_COLOR": "1"}).invoke(app, ["schema", "--markdown"])
    assert result.exit_code == 0 and result.stdout == schema_markdown()


def test_doc_names_every_key_of_every_section():
    text = schema_markdown()

    def walk(cls, prefix):
        assert f"## [{prefix}]" in text or not prefix, prefix
        for name, field in cls.model_fields.items():
            assert f"| `{name}` |" in text, f"{prefix}.{name}"
            sub = next((a for a in (field.annotation, *getattr(field.annotation, "__args__", ()))
                        if isinstance(a, type) and hasattr(a, "model_fields")), None)
            if sub is not None:
                walk(sub, f"{prefix}.{name}" if prefix else name)

    walk(Spec, "")


def test_every_key_has_a_meaning():
    """The page promises every key's meaning: each schema field carries a description."""
    undocumented = []

    def walk(cls, prefix):
        for name, field in cls.model_fields.items():
            sub = next((a for a in (field.annotation, *getattr(field.annotation, "__args__", ()))
                        if isinstance(a, type) and hasattr(a, "model_fields")), None)
            if sub is not None:
                walk(sub, f"{prefix}.{name}" if prefix else name)
            elif not (field.description or "").strip():
                undocumented.append(f"{prefix}.{name}" if prefix else name)

    walk(Spec, "")
    assert undocumented == []
