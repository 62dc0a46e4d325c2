"""The one registry helper, and the three registries built on it (models, rules, datasets)."""
import pytest

from bpfree.data import list_datasets, load_data
from bpfree.errors import BpfreeError
from bpfree.models import create_model, list_models
from bpfree.registry import Registry
from bpfree.rules import get_rule, list_rules, register_rule


def _colours(sort=True) -> Registry:
    r = Registry("colour", sort=sort)
    for name in ("red", "green", "grey", "blue"):
        r.register(name, name.upper(), f"the colour {name}")
    return r


def test_register_get_and_describe():
    r = _colours()
    assert r.get("green") == "GREEN" and "green" in r and "pink" not in r and len(r) == 4
    assert r.names() == ["blue", "green", "grey", "red"] == list(r)
    assert r.describe()["red"] == "the colour red"
    assert _colours(sort=False).names() == ["red", "green", "grey", "blue"]    # registration order


def test_duplicate_name_is_refused():
    r = _colours()
    with pytest.raises(BpfreeError, match="^colour 'red' is already registered$"):
        r.register("red", "again")
    assert r.get("red") == "RED"


def test_unknown_name_names_the_choices_in_one_line():
    with pytest.raises(BpfreeError, match=r"^unknown colour 'pink'; choose one of: blue, green, grey, red$"):
        _colours().get("pink")


@pytest.mark.parametrize("pattern, names", [
    ("g*", ["green", "grey"]), ("*e*", ["blue", "green", "grey", "red"]), ("gr?y", ["grey"]),
    ("[br]*", ["blue", "red"]), ("pink", []), (None, ["blue", "green", "grey", "red"])])
def test_fnmatch_filter(pattern, names):
    r = _colours()
    assert r.names(pattern) == names and list(r.describe(pattern)) == names


def test_copy_is_independent():
    r = _colours()
    other = r.copy()
    other.register("pink", "PINK")
    assert "pink" in other and "pink" not in r


# --- the registries built on it ---------------------------------------------------------------
def test_models_rules_and_datasets_filter_like_timm():
    assert list(list_models("resnet*")) == ["resnet110", "resnet18", "resnet32", "resnet56"]     # sorted names
    assert list(list_models("resnet1*")) == ["resnet110", "resnet18"]
    assert list(list_rules("lra*")) == ["lra-e"] and set(list_rules("*lra*")) == {"lra-e", "reclra"}
    assert list(list_datasets("*mnist")) == ["fashion-mnist", "mnist"]
    assert list(list_datasets("npz*")) == ["npz:PATH"]
    assert list_models("nope*") == {}


def test_unknown_names_share_one_message():
    for call, kind in ((lambda: create_model("nope", 10, (1, 8, 8)), "model"),
                       (lambda: get_rule("nope"), "method"),
                       (lambda: load_data("nope"), "dataset")):
        with pytest.raises(BpfreeError, match=rf"^unknown {kind} 'nope'; choose one of: \S"):
            call()


def test_a_rule_name_cannot_be_registered_twice():
    with pytest.raises(BpfreeError, match="method 'dgl' is already registered"):
        register_rule(get_rule("dgl"))


def test_every_rule_says_how_local_it_is_in_bpfree_list(capsys):
    from bpfree.cli import main
    from bpfree.rules import get_rule, list_rules
    assert main(["list", "rules"]) == 0
    out = capsys.readouterr().out
    for name in list_rules():
        rule = get_rule(name)
        assert rule.locality and f"locality: {rule.locality}; update-locked: {'yes' if rule.update_locked else 'no'}" in out
    assert get_rule("reclra").update_locked and get_rule("backprop").update_locked and not get_rule("dgl").update_locked
