"""The documentation agrees with the code and with itself: links resolve, what it quotes
relay saying is what relay says, the lists it keeps match the code's, and every install
hint names this project's distribution."""

from __future__ import annotations

import re
import tomllib
from importlib.metadata import version
from pathlib import Path

import pytest

from relay import DISTRIBUTION, __version__
from relay.runtime import _RESTART_ONLY
from tests.conftest import TOKEN, relay_config
from tests.processes import run_cli

ROOT = Path(__file__).parent.parent
DOCS = [ROOT / "README.md", ROOT / "SECURITY.md", ROOT / "CHANGELOG.md", ROOT / "deploy/README.md"]
DOCS += [*sorted((ROOT / "docs").glob("*.md")), ROOT / "bench/README.md"]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def anchors(markdown: str) -> set[str]:
    """GitHub's anchors for a file's headings."""
    found = set()
    for heading in re.findall(r"^#+ (.+)$", markdown, flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        found.add(slug)
    return found


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_and_anchor_resolves(doc: Path):
    text = doc.read_text()
    for target in LINK.findall(text):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        path, _, anchor = target.partition("#")
        file = (doc.parent / path).resolve() if path else doc
        assert file.exists(), f"{doc.name}: {target} -> no {file}"
        if anchor and file.suffix == ".md":
            assert anchor in anchors(file.read_text()), f"{doc.name}: no anchor {target}"


def test_the_readme_opens_with_the_two_set_up_commands_ci_runs():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci/run").read_text()
    for command in (
        "python3 -m venv .venv && . .venv/bin/activate && pip install . && relay serve",
        "python3 -m venv .venv && . .venv/bin/activate && pip install -e '.[test]' && pytest",
    ):
        assert f"```sh\n{command}\n```" in readme
        assert readme.index(command) < 2000, "the set-up commands belong on the first screen"
    assert "readme_command" in ci  # .ci/run reads them from the README, verbatim


def test_every_install_hint_names_this_projects_distribution():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["project"]["name"] == DISTRIBUTION == "qingstor-relay"
    assert __version__ == version(DISTRIBUTION)
    assert run_cli("--version").stdout.strip() == f"relay {__version__}"
    # Tests read events with cloudevents.core, which only 2.x has.
    assert any(
        r.startswith("cloudevents>=2")
        for r in pyproject["project"]["optional-dependencies"]["test"]
    )
    wrong = re.compile(r"pip install (?:-e )?['\"]?relay(?:\[|['\"\s]|$)", re.M)
    texts = [*DOCS, *(ROOT / "relay").rglob("*.py"), ROOT / "Dockerfile"]
    for path in texts:
        assert not wrong.search(path.read_text()), path
    assert "Apache License" in (ROOT / "LICENSE").read_text()
    assert pyproject["project"]["license"]["text"] == "Apache-2.0"


async def test_the_wrong_token_answer_quoted_in_the_readme_is_relays(tmp_path, start_relay):
    client = await start_relay(relay_config(tmp_path))
    wrong = await client.post("/hooks/qingstor?token=nope", json={"events": []})
    assert wrong.status == 401
    answer = await wrong.text()
    assert answer in (ROOT / "README.md").read_text()
    missing = await client.post("/hooks/qingstor", json={"events": []})
    assert (await missing.json())["message"].startswith("missing token: pass it as ?token=")
    assert TOKEN not in answer


def test_the_restart_only_keys_listed_are_the_codes():
    text = (ROOT / "docs/configuration.md").read_text()
    section = text.split("## Restart-only keys", 1)[1].split("Every other key", 1)[0]
    listed = set(re.findall(r"`((?:server|store|log|dedupe)\.[a-z_]+)`", section))
    assert listed == set(_RESTART_ONLY)


def test_no_comment_cites_a_design_file_outside_the_repository():
    outside = re.compile(r"\b(DESIGN|SINKS|ARCHITECTURE)\.md\b")
    roots = ["relay", "tests", "config", "deploy", "bench", ".ci"]
    files = [p for root in roots for p in (ROOT / root).rglob("*") if p.is_file()]
    for path in [*files, ROOT / "Dockerfile", ROOT / "pyproject.toml"]:
        if path.suffix in (".db", ".pyc") or "__pycache__" in path.parts:
            continue
        assert not outside.search(path.read_text(errors="replace")), path


@pytest.mark.parametrize("page", ["s3.md", "cloudevents.md"])
def test_the_config_snippets_of_the_source_pages_are_valid_configs(page: str, tmp_path: Path):
    """An operator copies these: each `sources:` snippet must pass `relay check-config`."""
    import yaml

    text = (ROOT / "docs" / page).read_text()
    snippets = [s for s in re.findall(r"```yaml\n(.*?)```", text, flags=re.S)]
    assert snippets
    for snippet in snippets:
        data = yaml.safe_load(snippet)
        # A snippet about routes names its sinks without defining them.
        sinks = data.setdefault("sinks", {})
        for name in {n for route in data.get("routes", []) for n in route["to"]} | {"app"}:
            sinks.setdefault(name, {"kind": "file", "path": f"{name}.jsonl"})
        if "sources" not in data:
            data["sources"] = {"minio": {"kind": "s3"}}
        path = tmp_path / "relay.yaml"
        path.write_text(yaml.safe_dump(data))
        env = {"RELAY_MINIO_TOKEN": "t" * 16, "RELAY_BUS_TOKEN": "u" * 16}
        result = run_cli("check-config", str(path), cwd=tmp_path, env=env)
        assert result.returncode == 0, f"{page}: {snippet}\n{result.stdout}{result.stderr}"
