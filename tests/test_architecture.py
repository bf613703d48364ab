"""The package boundaries of the README's architecture, read from the source with `ast` (nothing is imported).

keyrelay.core is the shared core; sidecar/ and publisher/ build on it alone; the CLI (the rest of
keyrelay/) drives all three; testbed/ is test infrastructure over the product; loadtest/ may use
anything but the tests. Lazy imports inside functions count as dependencies; imports under
`if TYPE_CHECKING:` do not (they never run). `python -m testbed.imports` prints the same graph.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from testbed.architecture_doc import PAGE, render
from testbed.imports import Import, component, cycles, read_imports

ROOT = Path(__file__).resolve().parent.parent
PRODUCT = {"keyrelay.core", "sidecar", "publisher", "keyrelay"}

# What each package may import besides itself (third-party and standard library aside).
ALLOWED = {
    "keyrelay.core": set(),
    "sidecar": {"keyrelay.core"},
    "publisher": {"keyrelay.core"},
    "keyrelay": {"keyrelay.core", "sidecar", "publisher"},
    "testbed": PRODUCT - {"testbed"},
    "loadtest": PRODUCT | {"testbed"},
    "tests": PRODUCT | {"testbed", "loadtest"},
}

# The tests of the benchmarks and the load test themselves: the only ones that import loadtest/.
# test_docs and test_k8s check the load test's settings table and its `keyrelay loadtest --help`.
LOADTEST_TESTS = {
    "tests.test_bench_find",
    "tests.test_bench_storm",
    "tests.test_bench_trust",
    "tests.test_bench_usage",
    "tests.test_docs",
    "tests.test_k8s",
    "tests.test_multiregion",
    "tests.test_report",
    "tests.test_wrk",
}


@pytest.fixture(scope="module")
def imports() -> list[Import]:
    return [i for i in read_imports(ROOT) if not i.typing_only]


def _where(found: list[Import]) -> list[str]:
    return [f"{i.path.relative_to(ROOT)}:{i.line} imports {i.target}" for i in found]


def test_every_package_of_the_tree_has_a_layer() -> None:
    packages = {p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file()}
    assert packages | {"keyrelay.core"} == set(ALLOWED)


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_each_package_imports_only_the_layers_beneath_it(package: str, imports: list[Import]) -> None:
    allowed = ALLOWED[package] | {package}
    wrong = [i for i in imports if component(i.source) == package and component(i.target) not in allowed]
    assert _where(wrong) == []


def test_the_product_never_imports_the_load_test_or_the_test_infrastructure(imports: list[Import]) -> None:
    wrong = [i for i in imports if component(i.source) in PRODUCT and component(i.target) in {"loadtest", "testbed"}]
    assert _where(wrong) == []


def test_only_the_tests_of_the_benchmarks_import_loadtest(imports: list[Import]) -> None:
    importers = {i.source for i in imports if component(i.source) == "tests" and component(i.target) == "loadtest"}
    assert importers <= LOADTEST_TESTS


def test_no_modules_import_each_other_in_a_cycle(imports: list[Import]) -> None:
    assert cycles((i.source, i.target) for i in imports) == []


def test_the_graph_counts_lazy_imports_and_leaves_out_type_checking_ones(tmp_path: Path) -> None:
    """The checker itself: a cycle closed by a lazy import is found, one closed under TYPE_CHECKING is not."""
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from . import b\n")
    (package / "b.py").write_text("def later():\n    from pkg.a import x\n")
    (package / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .a import y\n")
    (package / "d.py").write_text("import pkg.c\n")
    found = read_imports(tmp_path)
    assert {(i.source, i.target, i.typing_only) for i in found} == {
        ("pkg.a", "pkg.b", False),
        ("pkg.b", "pkg.a", False),
        ("pkg.c", "pkg.a", True),
        ("pkg.d", "pkg.c", False),
    }
    assert cycles((i.source, i.target) for i in found if not i.typing_only) == [["pkg.a", "pkg.b"]]


def test_the_architecture_page_names_every_module_with_its_docstring() -> None:
    # docs/architecture.md is the map of the tree; a module added or given a new job must show there.
    assert (ROOT / PAGE).read_text(encoding="utf-8") == render(ROOT), "run: python -m testbed.architecture_doc"


def test_the_publisher_runs_without_its_extras_until_a_setting_needs_them() -> None:
    # The Quickstart installs no extra: `keyrelay up` must start the publisher on SQLite without asyncpg or
    # joserfc (OpenID Connect) loaded, and building its app without a provider configured must not import them.
    probe = (
        "import sys, publisher.app as app_module\n"
        "from keyrelay.core.config import load\n"
        "from publisher.settings import PublisherSettings\n"
        "app_module.create_app(load(PublisherSettings, {}, {}))\n"
        "print(sorted(m for m in ('joserfc', 'asyncpg', 'cryptography') if m in sys.modules))\n"
    )
    ran = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, check=False)
    assert (ran.returncode, ran.stdout.strip()) == (0, "[]"), ran.stderr[-2000:]
