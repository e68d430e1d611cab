import pytest
from normlab_registry import CATALOGUE, PluginSpec, ResolutionError, resolve

INSTALLED = {
    "advbn": PluginSpec("advbn"),
    "augmix": PluginSpec("augmix"),
    "pgd": PluginSpec("pgd"),
    "condition": PluginSpec("condition", requires=("pgd",)),
    "nf": PluginSpec("nf", conflicts=("bnrect", "condition"), extra={"conflict_reasons": {"bnrect": "no BN left"}}),
    "bnrect": PluginSpec("bnrect"),
    "late": PluginSpec("late", after=("advbn",)),
    "broken": PluginSpec("broken", error="failed to import broken: ImportError: nope"),
}


def test_order_is_run_file_order():
    assert resolve(["augmix", "advbn"], INSTALLED) == ["augmix", "advbn"]
    assert resolve(["pgd", "condition"], INSTALLED) == ["pgd", "condition"]


def test_unknown_name_suggests_the_closest():
    with pytest.raises(ResolutionError, match=r"unknown plugin 'advnb' \(did you mean 'advbn'\?\)"):
        resolve(["advnb"], INSTALLED)


def test_known_but_not_installed_names_the_distribution():
    with pytest.raises(ResolutionError, match="pip install normlab-slim"):
        resolve(["slim"], INSTALLED)
    assert CATALOGUE["condition"].distribution == "normlab-condition"


def test_missing_requirement():
    with pytest.raises(ResolutionError, match="'condition' requires plugin 'pgd'"):
        resolve(["condition"], INSTALLED)


@pytest.mark.parametrize("order", [["nf", "bnrect"], ["bnrect", "nf"]])
def test_conflicts_either_direction_with_reason(order):
    with pytest.raises(ResolutionError, match="'bnrect' and 'nf' conflict: no BN left"):
        resolve(order, INSTALLED)


def test_broken_plugin_and_duplicates():
    with pytest.raises(ResolutionError, match="failed to load: failed to import broken"):
        resolve(["broken"], INSTALLED)
    with pytest.raises(ResolutionError, match="listed twice"):
        resolve(["pgd", "pgd"], INSTALLED)


def test_after_order_is_enforced_only_when_both_are_enabled():
    assert resolve(["advbn", "late"], INSTALLED) == ["advbn", "late"]
    assert resolve(["late"], INSTALLED) == ["late"]
    with pytest.raises(ResolutionError, match="plugin 'late' must be listed after 'advbn'"):
        resolve(["late", "advbn"], INSTALLED)
