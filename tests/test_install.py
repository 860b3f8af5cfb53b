"""The dependency ranges in pyproject.toml admit the installed releases, their own floors, and the environments our
users are in, so that installing the package never makes pip replace an installed torch (.ci/floor.sh also checks
that with ``pip install --dry-run --report``)."""

from importlib.metadata import version
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
REQUIREMENTS = {Requirement(spec).name: Requirement(spec) for spec in PYPROJECT["project"]["dependencies"]}

# Environments named in issue 12 that must be able to install us as they are.
USER_ENVIRONMENTS = {
    "axolotl 0.21": {"torch": "2.13.0", "transformers": "5.20.1", "trl": "1.14.1", "peft": "0.21.2",
                     "accelerate": "1.15.0"},
    "GPU check image": {"torch": "2.11.0+cu130", "transformers": "5.17.0", "accelerate": "1.15.0"},
    "torch 2.14": {"torch": "2.14.1"},
    "torch 2.15": {"torch": "2.15.0+cu128"},
}  # fmt: skip


def floor(requirement: Requirement) -> Version:
    bounds = [Version(s.version) for s in requirement.specifier if s.operator == ">="]
    assert len(bounds) == 1, f"{requirement} needs exactly one '>=' floor"
    return bounds[0]


@pytest.mark.parametrize("name", sorted(REQUIREMENTS))
def test_each_range_admits_the_installed_release_and_its_own_floor(name):
    requirement = REQUIREMENTS[name]
    assert requirement.specifier.contains(version(name), prereleases=True), f"{requirement} refuses {version(name)}"
    assert requirement.specifier.contains(floor(requirement))


def test_the_torch_range_admits_the_installed_torch_whatever_its_build():
    torch_requirement = REQUIREMENTS["torch"]
    installed = Version(version("torch"))
    assert torch_requirement.specifier.contains(installed, prereleases=True)
    assert torch_requirement.specifier.contains(installed.public)  # the same release as a CUDA or CPU build


@pytest.mark.parametrize("environment", sorted(USER_ENVIRONMENTS))
def test_user_environments_fit_the_ranges(environment):
    refused = {
        name: release
        for name, release in USER_ENVIRONMENTS[environment].items()
        if not REQUIREMENTS[name].specifier.contains(release)
    }
    assert refused == {}, f"{environment}: our ranges refuse {refused}"


def test_readme_ranges_table_states_the_pyproject_floors():
    readme = (ROOT / "README.md").read_text()
    table = readme.split("<!-- ranges:begin -->")[1].split("<!-- ranges:end -->")[0]
    rows = [line.split("|")[1:4] for line in table.strip().splitlines()[2:]]
    stated = {name.strip(): (spec.strip(), tested.strip().split()[0]) for name, spec, tested in rows}
    for name, (spec, floor_tested) in stated.items():
        assert Requirement(name + spec.replace(" ", "")).specifier == REQUIREMENTS[name].specifier, name
        if name != "torch":  # torch's floor is named by its API; CI runs the floor set on 2.13.0 CPU
            assert Version(floor_tested) == floor(REQUIREMENTS[name]), name
