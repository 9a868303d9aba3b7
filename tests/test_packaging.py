"""The installed package must hold every subpackage (tests run from the checkout and would
not notice a missing one)."""

import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.skipif(sys.version_info < (3, 11), reason="tomllib is Python 3.11+")
def test_pyproject_lists_every_package():
    import tomllib

    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(cfg["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "lukern").rglob("__init__.py")}
    found |= {"lukern_tuning" + "".join("." + x for x in p.parent.relative_to(ROOT / "tuning").parts)
              for p in (ROOT / "tuning").rglob("__init__.py")}
    assert found - listed == set(), f"add these to [tool.setuptools] packages: {sorted(found - listed)}"
    assert cfg["package-dir"]["lukern_tuning"] == "tuning"


def test_public_names_are_sorted_and_importable():
    import lukern

    assert lukern.__all__ == sorted(lukern.__all__)
    for name in lukern.__all__:
        assert hasattr(lukern, name), name
