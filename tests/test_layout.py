"""The package's layout: only the five commands read flags (the library takes values as arguments), no module
is over 400 lines, and README's Layout section names every module and folder."""

import ast
import re
import subprocess

import pytest

from conftest import REPO

PACKAGE = REPO / "pit_keras"
COMMANDS = ("train.py", "evaluate.py", "export.py", "predict.py", "image_labels.py")
MAX_LINES = 400


def modules():
    return sorted(PACKAGE.rglob("*.py"))


def flag_reads(source):
    """`(line, what)` of every use of absl's global `FLAGS` in `source`: `FLAGS.x`, `FLAGS[...]`, `x in FLAGS`,
    `flags.FLAGS` (any `.FLAGS`) and `from absl.flags import FLAGS`. Defining flags (`flags.DEFINE_*`) and
    reading a definition's `FlagHolder` are not uses, nor is parsing the command line, `FLAGS(argv)`
    (`errors.run_main` does it for every command, as absl's `app.run` would)."""
    tree = ast.parse(source)
    parses = {id(node.func) for node in ast.walk(tree) if isinstance(node, ast.Call)
              and [ast.unparse(arg) for arg in node.args] == ["argv"] and not node.keywords}
    found = []
    for node in ast.walk(tree):
        if id(node) in parses:
            continue
        if isinstance(node, ast.Name) and node.id == "FLAGS":
            found.append((node.lineno, "FLAGS"))
        elif isinstance(node, ast.Attribute) and node.attr == "FLAGS":
            found.append((node.lineno, ast.unparse(node)))
        elif isinstance(node, ast.ImportFrom) and any(alias.name == "FLAGS" for alias in node.names):
            found.append((node.lineno, f"from {node.module} import FLAGS"))
    return sorted(set(found))


@pytest.mark.parametrize("snippet", [
    "x = FLAGS.model_dir", "x = FLAGS['model_dir'].value", "x = 'seed' in FLAGS",
    "from absl import flags\nF = flags.FLAGS", "import absl.flags\nx = absl.flags.FLAGS.seed",
    "from absl.flags import FLAGS",
])
def test_flag_reads_are_found_in_every_form(snippet):
    assert flag_reads(snippet)


def test_flag_definitions_and_parsing_are_not_flag_reads():
    assert not flag_reads("from absl import flags\nholder = flags.DEFINE_integer('seed', 0, 'Seed.')\nholder.value")
    assert not flag_reads("from absl import flags\nrest = flags.FLAGS(argv)")
    assert flag_reads("from absl import flags\nrest = flags.FLAGS(['prog', '--seed=1'])")  # sets flags
    assert flag_reads("from absl import flags\nrest = flags.FLAGS(argv)\nx = flags.FLAGS.seed")


def test_only_the_commands_read_flags():
    assert all((PACKAGE / command).is_file() for command in COMMANDS)
    readers = {}
    for path in modules():
        relative = path.relative_to(PACKAGE).as_posix()
        if relative in COMMANDS:
            continue
        reads = flag_reads(path.read_text())
        if reads:
            readers[relative] = reads
    assert not readers, (f"library modules read absl FLAGS (only {', '.join(COMMANDS)} may; pass values as "
                         f"arguments): {readers}")


def test_no_module_is_over_400_lines():
    long = {path.relative_to(PACKAGE).as_posix(): count for path in modules()
            if (count := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines (split them by job): {long}"


def readme_layout():
    """The code block of README's Layout section."""
    text = (REPO / "README.md").read_text()
    section = text.split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    return section.split("```", 2)[1]


def test_the_readme_layout_names_every_module_and_folder_and_nothing_else():
    layout = readme_layout()
    package_part = layout.split("\nflags/", 1)[0]
    files = {path.relative_to(PACKAGE) for path in modules() if path.name != "__init__.py"}
    unnamed = sorted(str(f) for f in files if not re.search(rf"(?<![\w/]){re.escape(f.name)}\b", package_part))
    assert not unnamed, f"README's Layout does not name: {unnamed}"
    named = set(re.findall(r"(?<![\w/])(\w+\.py)\b", package_part))
    assert named - {f.name for f in files} == set(), "README's Layout names modules that do not exist"
    folders = {f.parent.as_posix() for f in files} - {"."}
    assert {f"{name}/" for name in folders} == set(re.findall(r"^  (\w+/)", package_part, re.M))
    named_top = set(re.findall(r"^(\w+)/", layout, re.M))
    assert all((REPO / name).is_dir() for name in named_top), named_top
    if (REPO / ".git").exists():  # the repository's own top-level folders: those of the files git tracks
        tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
        top = {line.split("/", 1)[0] for line in tracked.splitlines() if "/" in line and not line.startswith(".")}
        assert top == named_top, top
