"""Registration into OpenPCDet's registries."""
import pytest

import pcdet_ext
from pcdet_ext.openpcdet.registry import REGISTRY_MODULES, RegistryClashError, register_class, registered_classes


def test_register_is_idempotent_and_covers_the_table():
    first = pcdet_ext.register()
    second = pcdet_ext.register()
    assert first == second
    import importlib
    table = registered_classes()
    assert {name for _, name, _ in table} >= {"PointPillarRQ", "RMAECMAEDetectorPhase1", "RMAECMAEBackbonePhase1"}
    for registry, name, cls in table:
        module = importlib.import_module(REGISTRY_MODULES[registry])
        assert module.__all__[name] is cls and getattr(module, name) is cls
        assert cls.__module__.startswith("pcdet_ext.openpcdet.models.")  # the class lives next to its registry


def test_every_registry_module_is_a_dict_registry():
    import importlib
    for registry, module_name in REGISTRY_MODULES.items():
        assert isinstance(importlib.import_module(module_name).__all__, dict), registry


def test_new_name_is_registered_and_buildable():
    from pcdet.models import detectors
    from pcdet.models.detectors import PointPillar

    class TierTwoPillar(PointPillar):
        pass
    try:
        assert register_class("detectors", "TierTwoPillar", TierTwoPillar) is True
        assert register_class("detectors", "TierTwoPillar", TierTwoPillar) is False  # idempotent
        assert detectors.__all__["TierTwoPillar"] is TierTwoPillar and detectors.TierTwoPillar is TierTwoPillar
    finally:
        detectors.__all__.pop("TierTwoPillar", None)
        delattr(detectors, "TierTwoPillar")


def test_clash_names_both_classes_unless_override():
    from pcdet.models import detectors
    original = detectors.__all__["PointPillar"]

    class PointPillar(original):
        pass
    with pytest.raises(RegistryClashError) as err:
        register_class("detectors", "PointPillar", PointPillar)
    msg = str(err.value)
    assert "pcdet.models.detectors.pointpillar.PointPillar" in msg and "test_registry" in msg and "override=True" in msg
    assert detectors.__all__["PointPillar"] is original
    try:
        assert register_class("detectors", "PointPillar", PointPillar, override=True)
        assert detectors.__all__["PointPillar"] is PointPillar
    finally:
        register_class("detectors", "PointPillar", original, override=True)


def test_dataset_registry():
    import pcdet.datasets as datasets
    from pcdet.datasets.custom.custom_dataset import CustomDataset

    class IsarcDataset(CustomDataset):
        pass
    try:
        register_class("datasets", "IsarcDataset", IsarcDataset)
        assert datasets.__all__["IsarcDataset"] is IsarcDataset and datasets.IsarcDataset is IsarcDataset
    finally:
        datasets.__all__.pop("IsarcDataset")
        delattr(datasets, "IsarcDataset")


def test_unknown_registry_is_an_error():
    with pytest.raises(KeyError, match="unknown registry 'heads'"):
        register_class("heads", "X", object)
