import os
import pathlib

import pytest

SHARED_DATA = pathlib.Path(
    os.environ.get("LUKERN_DATA", pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data")
)


def pytest_collection_modifyitems(config, items):
    if os.environ.get("LUKERN_NIGHTLY") == "1":
        return
    skip = pytest.mark.skip(reason="nightly: set LUKERN_NIGHTLY=1 to run")
    for item in items:
        if "nightly" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def shared_data():
    """Folder of the licensed click logs beside the checkout; skip when absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data folder {SHARED_DATA} is absent")
    return SHARED_DATA
