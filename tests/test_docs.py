"""The documentation: the README stays short, the configuration reference is the code's,
and every link in README.md and docs/ leads somewhere."""

from __future__ import annotations

import dataclasses
import re
import shlex
from pathlib import Path

import pytest

from u2seg.cli import main, parse_args
from u2seg.config import PipelineConfig, load_config, reference_markdown

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")  # links and pictures


def _keys(cfg: object, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(cfg):  # type: ignore[arg-type]
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            keys += _keys(value, f"{prefix}{f.name}.")
        else:
            keys.append(prefix + f.name)
    return keys


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens,
    repeats numbered."""
    seen: dict[str, int] = {}
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    for heading in re.findall(r"^#{1,6} (.+)$", text, flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        if count:
            seen[f"{slug}-{count}"] = 1
    return set(seen)


def _links(page: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return LINK.findall(text)


def test_readme_is_short():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) < 200


def test_configuration_reference_is_generated_from_the_code():
    committed = (ROOT / "docs" / "configuration.md").read_text()
    assert committed == reference_markdown() + "\n", (
        "docs/configuration.md differs from the code: run `u2seg reference > docs/configuration.md`"
    )


def test_every_config_key_is_in_the_reference():
    reference = (ROOT / "docs" / "configuration.md").read_text()
    keys = _keys(PipelineConfig())
    assert len(keys) > 150
    missing = [key for key in keys if f"| `{key}` |" not in reference]
    assert not missing


def test_every_docs_page_is_linked_from_the_readme():
    linked = {Path(link).name for link in _links(ROOT / "README.md")}
    assert {page.name for page in PAGES[1:]} <= linked


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_links_resolve(page: Path):
    broken = []
    for link in _links(page):
        if re.match(r"[a-z]+://|mailto:", link):
            continue
        target, _, anchor = link.partition("#")
        path = (page.parent / target).resolve() if target else page
        if not path.exists():
            broken.append(f"{link}: no such file")
        elif anchor and anchor not in _anchors(path):
            broken.append(f"{link}: no heading #{anchor}")
    assert not broken, broken


def test_anchor_rule_matches_githubs():
    page = ROOT / "docs" / "method.md"
    assert "why-the-demo-does-not-use-the-published-maskcut-settings" in _anchors(page)


COMMAND = re.compile(r"^(?:\.venv/bin/)?u2seg\s")
SHELL_STOP = {">", ">>", "|", "&&", ";", "2>&1"}
#: Commands the docs show to be refused (exit status 2), with the reason they print.
REFUSED = {"plan --gpus 1 --cpus 16 --memory 64 train.num_workers=4": "train.num_workers=1"}
KEY_VALUE = re.compile(r"^([a-z_]+(?:\.[a-z_]+)+)=\S*$")


def _commands(page: Path) -> list[str]:
    """Every `u2seg ...` command of a page: code-block lines (continuations joined) and
    inline code spans."""
    text = page.read_text()
    found = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            if COMMAND.match(line.strip()):
                found.append(line.strip())
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    found += [span for span in re.findall(r"`([^`\n]+)`", prose) if COMMAND.match(span)]
    return found


def _words(command: str) -> list[str]:
    words = []
    for word in shlex.split(command, comments=True)[1:]:
        if word in SHELL_STOP:
            break
        words.append(word)
    return words


DOC_COMMANDS = sorted({(p.name, c) for p in PAGES for c in _commands(p)})


def test_the_docs_show_commands() -> None:
    pages = {name for name, _ in DOC_COMMANDS}
    assert {"README.md", "getting-started.md", "cluster.md", "evaluation.md"} <= pages
    assert len(DOC_COMMANDS) > 30


@pytest.mark.parametrize("page, command", DOC_COMMANDS)
def test_every_command_in_the_docs_names_real_commands_and_keys(
    page: str, command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """It parses as the `u2seg` command line does, its config file exists where it names
    one of the repository's, and its key=value overrides load; `plan` on a described
    cluster, `--print-config` and `reference` run (they take seconds)."""
    words = _words(command)
    if words[0].startswith("<"):  # the general form, `u2seg <command> --help`
        words[0] = "features"
    if "--help" in words:
        with pytest.raises(SystemExit) as done:
            parse_args(words)
        assert done.value.code == 0
        return
    args = parse_args(words)
    overrides = [w for w in getattr(args, "overrides", []) if "=" in w and "..." not in w]
    config = getattr(args, "config", None)
    if config is not None and str(config).startswith("configs/"):
        assert (ROOT / config).is_file(), config
    load_config(ROOT / config if config and (ROOT / config).is_file() else None, overrides)
    runs = (
        args.command == "reference"
        or getattr(args, "print_config", False)
        or (args.command == "plan" and args.gpus is not None)
    )
    if runs:
        here = [f"--config={ROOT / config}" if w == str(config) else w for w in words]
        here = [w for w in here if w != "--config"] if config else here
        code = main(here)
        out = capsys.readouterr()
        expected = REFUSED.get(" ".join(words))
        assert code == (2 if expected else 0), out.err
        assert out.out.strip()
        if expected:
            assert expected in out.out


def test_every_key_value_in_the_docs_is_a_config_key() -> None:
    keys = set(_keys(PipelineConfig()))
    unknown = []
    for page in PAGES:
        prose = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
        for span in re.findall(r"`([^`\n]+)`", prose):
            for word in span.split():
                match = KEY_VALUE.match(word)
                if match and match.group(1) not in keys:
                    unknown.append(f"{page.name}: {word}")
    assert not unknown, unknown


def test_nothing_cites_a_file_outside_the_repository() -> None:
    sources = [*PAGES, *ROOT.glob("u2seg/**/*.py"), *ROOT.glob("configs/*.yaml"),
               *ROOT.glob("cluster/*.py"), *ROOT.glob("benchmarks/*.py")]  # fmt: skip
    citing = [str(p.relative_to(ROOT)) for p in sources
              if "METHOD.md" in p.read_text() or "../shared" in p.read_text()]  # fmt: skip
    assert not citing, citing
