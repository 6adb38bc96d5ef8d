import pytest

from fxsparse import IgnoredScope, ScopeError, TargetScope
from fxsparse.scope import resolve_targets

NAMES = [f"model.layers.{i}.{p}" for i in range(3) for p in
         ("self_attn.q_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.gate_proj", "mlp.down_proj")
         ] + ["lm_head"]


def test_patterns_match_in_full_and_names_exactly():
    targets, skipped = resolve_targets(
        NAMES,
        {TargetScope(patterns=[r".*mlp\.(up|gate)_proj"]): 0.3,
         TargetScope(names=["model.layers.0.mlp.down_proj"]): 0.5},
        IgnoredScope(patterns=[r"model\.layers\.2\..*"]),
    )
    assert targets == {
        "model.layers.0.mlp.up_proj": 0.3, "model.layers.0.mlp.gate_proj": 0.3,
        "model.layers.1.mlp.up_proj": 0.3, "model.layers.1.mlp.gate_proj": 0.3,
        "model.layers.0.mlp.down_proj": 0.5,
    }
    assert skipped["model.layers.2.mlp.up_proj"] == "ignored_scope"
    assert skipped["lm_head"] == "no TargetScope matches it"
    # "up_proj" alone is a substring, not a full match: it matches nothing
    with pytest.raises(ScopeError, match="matches no linear layer.*nearest"):
        resolve_targets(NAMES, {TargetScope(patterns=["up_proj"]): 0.3})


def test_unknown_name_shows_nearest():
    with pytest.raises(ScopeError, match="model.layers.0.mlp.down_proj"):
        resolve_targets(NAMES, {TargetScope(names=["model.layers.0.mlp.down_prj"]): 0.3})


def test_conflicting_targets():
    with pytest.raises(ScopeError, match="claimed by"):
        resolve_targets(NAMES, {TargetScope(patterns=[r".*mlp\..*"]): 0.3,
                                TargetScope(patterns=[r".*down_proj"]): 0.5})
    # the same target from two scopes is no conflict
    t, _ = resolve_targets(NAMES, {TargetScope(patterns=[r".*mlp\..*"]): 0.3,
                                   TargetScope(patterns=[r".*down_proj"]): 0.3})
    assert t["model.layers.1.mlp.down_proj"] == 0.3


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan"), "0.3", True])
def test_sparsity_out_of_range(bad):
    with pytest.raises(ScopeError, match="sparsity"):
        resolve_targets(NAMES, {TargetScope(names=["lm_head"]): bad})


def test_unknown_ignored_name():
    with pytest.raises(ScopeError, match="IgnoredScope names 'lm_hed'.*lm_head"):
        resolve_targets(NAMES, {TargetScope(names=["lm_head"]): 0.2}, IgnoredScope(names=["lm_hed"]))


def test_bad_regex_fails_at_construction():
    with pytest.raises(ScopeError, match="invalid regular expression"):
        TargetScope(patterns=["(up"])


def test_scopes_are_hashable_values():
    assert TargetScope(names=["a"]) == TargetScope(names=("a",))
    assert hash(TargetScope(patterns="x")) == hash(TargetScope(patterns=["x"]))
    assert TargetScope(names=["a"]) != IgnoredScope(names=["a"])
