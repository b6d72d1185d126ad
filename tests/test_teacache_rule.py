"""TeaCache's skip rule and hooks on dummy blocks whose arithmetic is exact.

Each dummy block returns (encoder + 1, 2 * hidden), so a stack of N blocks maps x to 2**N * x with the residual
(2**N - 1) * x; the gate signal is the `temb` argument itself, so a test chooses the relative L1 changes exactly.
"""

import itertools
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers.hooks._helpers import TransformerBlockMetadata, TransformerBlockRegistry
from diffusers.models.cache_utils import CacheMixin

from teaserve.cache import (
    CacheSettingsError,
    CacheTarget,
    Rescaling,
    TeaCacheConfig,
    apply_teacache,
    create_cache_backend,
    register_cache_target,
    remove_teacache,
)
from teaserve.cache.targets import _TARGETS, MAX_RELATIVE_CHANGE
from teaserve.cache.teacache import BranchStats, TeaCachePolicy

IDENTITY = (0.0, 0.0, 0.0, 1.0, 0.0)


class DummyBlock(torch.nn.Module):
    def forward(self, hidden_states, encoder_hidden_states, temb):
        return encoder_hidden_states + 1, hidden_states * 2


class DummyTransformer(CacheMixin, torch.nn.Module):
    def __init__(self, num_blocks: int):
        super().__init__()
        self.transformer_blocks = torch.nn.ModuleList(DummyBlock() for _ in range(num_blocks))

    def forward(self, hidden_states, temb, timestep=None):
        encoder_hidden_states = torch.zeros(1)
        for block in self.transformer_blocks:
            encoder_hidden_states, hidden_states = block(
                hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states, temb=temb
            )
        return hidden_states


@pytest.fixture(autouse=True)
def dummy_registered():
    registered = dict(_TARGETS)
    TransformerBlockRegistry.register(
        model_class=DummyBlock,
        metadata=TransformerBlockMetadata(return_hidden_states_index=1, return_encoder_hidden_states_index=0),
    )
    register_cache_target(
        DummyTransformer,
        CacheTarget(
            blocks=lambda transformer: transformer.transformer_blocks,
            gate=lambda block, arguments: arguments["temb"],
            defaults={"tea_cache": {"coefficients": IDENTITY}},
        ),
    )
    yield
    _TARGETS.clear()
    _TARGETS.update(registered)


def gates_from_changes(changes):
    """Gate values whose successive relative changes are exactly `changes` (powers of two keep floats exact)."""
    gates = [1.0]
    for change in changes:
        gates.append(gates[-1] * (1 + change))
    return gates


def run(config, gate_sequences, num_blocks=3, overrides=None):
    """Run one request of len(gates) steps; returns (outputs per branch, stats). Input at step i is i + 1."""
    transformer = DummyTransformer(num_blocks)
    backend = create_cache_backend("tea_cache", config)
    backend.apply(SimpleNamespace(transformer=transformer))
    num_steps = len(next(iter(gate_sequences.values())))
    backend.begin_request(num_steps, overrides)
    outputs = {branch: [] for branch in gate_sequences}
    for step in range(num_steps):
        backend.set_step(step)
        for branch, gates in gate_sequences.items():
            with transformer.cache_context(branch):
                x = torch.tensor([float(step + 1)])
                outputs[branch].append(transformer(hidden_states=x, temb=torch.tensor([gates[step]])).item())
    return outputs, backend.stats()


def test_schedule_matches_hand_computed_values():
    # changes 0.25, 0.25, 0.25, 0.5, 0.25 with threshold 0.6 and the identity polynomial:
    # step 0 forced; 1: acc .25 skip; 2: .5 skip; 3: .75 compute (reset); 4: .5 skip; 5: .75 compute; 6: last.
    gates = gates_from_changes([0.25, 0.25, 0.25, 0.5, 0.25, 0.25])
    outputs, stats = run({"rel_l1_thresh": 0.6, "coefficients": IDENTITY}, {"cond": gates})
    branch = stats["branches"]["cond"]
    assert branch["schedule"] == "CSSCSCC"
    assert branch["rel_l1"] == [None, 0.25, 0.25, 0.25, 0.5, 0.25, 0.25]
    assert branch["accumulated"] == [0.0, 0.25, 0.5, 0.75, 0.5, 0.75, 0.0]
    assert (branch["computed_steps"], branch["skipped_steps"]) == (4, 3)
    # computed steps give 8x; skipped ones x + the residual 7 * x_last_computed
    assert outputs["cond"] == [8.0, 2 + 7 * 1, 3 + 7 * 1, 32.0, 5 + 7 * 4, 48.0, 56.0]


def test_polynomial_rescales_the_change():
    # f(x) = 4 x^2: changes 0.25 -> 0.25 each; threshold 0.6 -> the same schedule as the identity above
    gates = gates_from_changes([0.25, 0.25, 0.25, 0.5, 0.25, 0.25])
    _, stats = run({"rel_l1_thresh": 0.6, "coefficients": [0, 0, 4, 0, 0]}, {"cond": gates})
    assert stats["branches"]["cond"]["accumulated"] == [0.0, 0.25, 0.5, 0.75, 1.0, 0.25, 0.0]
    assert stats["branches"]["cond"]["schedule"] == "CSSCCSC"


def test_a_polynomial_negative_at_small_changes_still_counts_every_change():
    # f(x) = x - 0.3 has no fitted range: it is trusted where it is positive and increasing (x > 0.3); below that
    # it falls in proportion to x, so 0.25 counts a little more than nothing and a threshold near zero computes all.
    gates = gates_from_changes([0.25, 0.25, 0.5, 0.25, 0.5, 0.25])
    _, stats = run({"rel_l1_thresh": 1e-9, "coefficients": [0, 0, 0, 1, -0.3]}, {"cond": gates})
    assert stats["branches"]["cond"]["schedule"] == "CCCCCCC"
    _, stats = run({"rel_l1_thresh": 0.3, "coefficients": [0, 0, 0, 1, -0.3]}, {"cond": gates})
    accumulated = stats["branches"]["cond"]["accumulated"]
    assert 0 < accumulated[1] < accumulated[2] < 0.001 and accumulated[3] == pytest.approx(accumulated[2] + 0.2)


def test_first_and_last_steps_are_always_computed():
    gates = gates_from_changes([0.5] * 5)
    _, stats = run({"rel_l1_thresh": 1e9, "coefficients": IDENTITY}, {"cond": gates})
    assert stats["branches"]["cond"]["schedule"] == "CSSSSC"


def test_max_consecutive_skips_caps_runs_of_skips():
    gates = gates_from_changes([0.125] * 7)
    _, stats = run({"rel_l1_thresh": 1e9, "coefficients": IDENTITY, "max_consecutive_skips": 2}, {"cond": gates})
    assert stats["branches"]["cond"]["schedule"] == "CSSCSSCC"


def test_branches_keep_independent_state():
    cond = gates_from_changes([0.25, 0.25, 0.25, 0.25])
    uncond = gates_from_changes([0.5, 0.5, 0.5, 0.5])
    outputs, stats = run({"rel_l1_thresh": 0.6, "coefficients": IDENTITY}, {"cond": cond, "uncond": uncond})
    assert stats["branches"]["cond"]["schedule"] == "CSSCC"
    assert stats["branches"]["uncond"]["schedule"] == "CSCSC"
    assert outputs["uncond"] == [8.0, 2 + 7 * 1, 24.0, 4 + 7 * 3, 40.0]
    assert stats["computed_steps"] == 6 and stats["skipped_steps"] == 4


def test_request_overrides_and_disabling():
    gates = gates_from_changes([0.25] * 4)
    _, stats = run({"rel_l1_thresh": 0.6, "coefficients": IDENTITY}, {"cond": gates}, overrides={"rel_l1_thresh": 0.2})
    assert stats["rel_l1_thresh"] == 0.2 and stats["branches"]["cond"]["schedule"] == "CCCCC"
    outputs, stats = run(
        {"rel_l1_thresh": 1e9, "coefficients": IDENTITY}, {"cond": gates}, overrides={"enabled": False}
    )
    assert stats["enabled"] is False and stats["branches"] == {}
    assert outputs["cond"] == [8.0 * (step + 1) for step in range(5)]


def test_policy_unit_without_hooks():
    policy = TeaCachePolicy(Rescaling(IDENTITY), rel_l1_thresh=0.3)
    stats = BranchStats()
    decisions = [policy.should_compute(r, i, 5, stats) for i, r in enumerate([None, 0.1, 0.1, 0.2, 0.1])]
    assert decisions == [True, False, False, True, True]


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"rel_l1_thresh": 0}, r"rel_l1_thresh must be a number in \(0, 1e\+09\]"),
        ({"rel_l1_thresh": "0.2"}, r"rel_l1_thresh must be a number in"),
        ({"rel_l1_thresh": 10**400}, r"rel_l1_thresh must be a number in"),
        ({"rel_l1_thresh": 1e308}, r"rel_l1_thresh must be a number in"),
        ({"rel_l1_thresh": math.nan}, r"rel_l1_thresh must be a number in"),
        ({"coefficients": [1, 2, 3]}, r"coefficients must be a list of 5 numbers"),
        ({"coefficients": [1e308] * 5}, r"coefficients must be numbers in \[-1e\+09, 1e\+09\]"),
        ({"coefficients": [10**400] * 5}, r"coefficients must be numbers in"),
        ({"coefficients": [0, 0, 0, 0, -1]}, r"not positive and increasing anywhere"),
        ({"coefficients": IDENTITY, "x_range": [0.5, 0.1]}, r"x_range must be \[low, high\]"),
        ({"coefficients": [0, 0, 0, 1, -0.3], "x_range": [0.1, 0.5]}, r"must be positive over their x_range"),
        ({"x_range": [0.1, 0.5]}, r"give it together with coefficients"),
        ({"max_consecutive_skips": 0}, r"max_consecutive_skips must be an integer in \[1, 10000\]"),
        ({"max_consecutive_skips": 10**400}, r"max_consecutive_skips must be an integer"),
        (
            {"threshold": 0.2},
            r"unknown tea_cache setting\(s\) \['threshold'\]; valid keys: rel_l1_thresh, coefficients, x_range",
        ),
    ],
)
def test_bad_config_names_the_valid_keys(config, message):
    with pytest.raises(ValueError, match=message):
        create_cache_backend("tea_cache", config)


@pytest.mark.parametrize(
    "overrides",
    [
        {"coefficients": [0, 0, 0, 1, 0]},
        {"coefficients_file": "/etc/passwd"},
        {"x_range": [0, 1]},
        {"thresh": 1},
    ],
)
def test_a_request_may_set_only_the_threshold_the_skip_limit_and_enabled(overrides):
    backend = create_cache_backend("tea_cache", {})
    with pytest.raises(CacheSettingsError) as error:
        backend.check_overrides(overrides)
    message = str(error.value)
    assert error.value.param == "cache_config"
    assert "valid keys for a request: enabled, rel_l1_thresh, max_consecutive_skips" in message
    assert "/etc" not in message and "passwd" not in message


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"enabled": "no"}, r"'enabled' must be true or false"),
        ({"rel_l1_thresh": 10**400}, r"cache_config: rel_l1_thresh must be a number in"),
        ({"rel_l1_thresh": -1}, r"cache_config: rel_l1_thresh must be a number in"),
        ({"max_consecutive_skips": 2.5}, r"cache_config: max_consecutive_skips must be an integer"),
    ],
)
def test_bad_request_values_are_refused_without_echoing_long_input(overrides, message):
    backend = create_cache_backend("tea_cache", {})
    with pytest.raises(CacheSettingsError, match=message):
        backend.check_overrides(overrides)
    with pytest.raises(CacheSettingsError, match=r"got 'x{36}\.\.\.$"):
        backend.check_overrides({"rel_l1_thresh": "x" * 10_000})


# -- the rescaling polynomial outside its range -----------------------------------------------------------------
FITTED = (-5712.29571871, 1493.11886556, -87.59693888, -0.66030614, 0.17680775)  # goes negative above x = 0.176
FITTED_RANGE = (0.034, 0.148)


def test_the_polynomial_is_used_inside_its_range_only():
    rescale = Rescaling(FITTED, FITTED_RANGE)
    for x in np.linspace(*FITTED_RANGE, 50):
        assert rescale(x) == pytest.approx(np.polyval(FITTED, x), rel=1e-12)
    end = rescale(FITTED_RANGE[1])
    beyond = [rescale(x) for x in (0.16, 0.2, 0.25, 1.0, 1e3)]
    assert end < beyond[0] and beyond == sorted(beyond) and len(set(beyond)) == len(beyond)
    assert np.polyval(FITTED, 0.25) < 0 < rescale(0.25)  # the raw polynomial would count this change as none
    smallest = min(rescale(x) for x in np.linspace(*FITTED_RANGE, 200))
    below = [rescale(x) for x in (1e-6, 0.001, 0.01, 0.03)]
    assert 0 < below[0] < below[1] < below[2] < below[3] <= smallest
    assert rescale(0.0) == 0.0


@pytest.mark.parametrize("family", ["qwen_image", "flux", "bagel"])
def test_built_in_coefficients_never_count_a_larger_change_as_smaller(family):
    from teaserve.pipelines import bagel, flux, qwen_image

    module = {"qwen_image": qwen_image, "flux": flux, "bagel": bagel.family}[family]
    (coefficients,) = (value for name, value in vars(module).items() if name.endswith("_COEFFICIENTS"))
    rescale = Rescaling(coefficients)
    values = [rescale(x) for x in np.linspace(1e-6, 2.0, 20_001)]
    assert all(value > 0 for value in values)
    assert all(later >= earlier for earlier, later in itertools.pairwise(values))
    low, high = rescale.trusted
    inside = np.linspace(low, high, 100)
    assert [rescale(x) for x in inside] == pytest.approx(list(np.polyval(coefficients, inside)))


def test_statistics_stay_finite_when_the_gate_blows_up():
    gates = [1.0, 2.0, math.inf, 3.0, 1e300, 4.0]
    _, stats = run({"rel_l1_thresh": 1e9, "coefficients": [1e9, 1e9, 1e9, 1e9, 1e9]}, {"cond": gates})
    json.dumps(stats, allow_nan=False)  # a JSON response or SSE event can carry it
    assert stats["branches"]["cond"]["rel_l1"][2:5] == [MAX_RELATIVE_CHANGE] * 3


# -- apply_teacache without an engine -------------------------------------------------------------------------------
def test_apply_teacache_counts_steps_per_branch_and_forces_the_last():
    transformer = DummyTransformer(2)
    config = TeaCacheConfig(rel_l1_thresh=1e9, coefficients=IDENTITY)
    teacache = apply_teacache(transformer, config, num_inference_steps=5)
    with pytest.raises(ValueError, match="already applied"):
        apply_teacache(transformer, config)
    for _ in range(2):  # two pipeline calls: diffusers resets the hooks' state after each
        for step in range(5):
            with transformer.cache_context("cond"):
                transformer(hidden_states=torch.tensor([1.0]), temb=torch.tensor([1.0 + step]))
        assert teacache.stats()["branches"]["cond"]["schedule"] == "CSSSC"
        transformer._reset_stateful_cache()
    remove_teacache(transformer)
    assert transformer(hidden_states=torch.tensor([1.0]), temb=torch.tensor([1.0])).item() == 4.0


def test_calls_outside_cache_context_are_named_by_their_order_in_the_step():
    transformer = DummyTransformer(2)
    teacache = apply_teacache(transformer, TeaCacheConfig(rel_l1_thresh=0.6, coefficients=IDENTITY))
    cond, uncond = gates_from_changes([0.25] * 4), gates_from_changes([0.5] * 4)
    for step in range(5):
        for gates in (cond, uncond):
            timestep = torch.tensor([1000.0 - step])
            transformer(hidden_states=torch.tensor([1.0]), temb=torch.tensor([gates[step]]), timestep=timestep)
    schedules = {name: branch["schedule"] for name, branch in teacache.stats()["branches"].items()}
    assert schedules == {"cond": "CSSCS", "uncond": "CSCSC"}  # no step count given: the last is not forced


def test_unsupported_transformer_fails_at_apply():
    import teaserve.pipelines  # noqa: F401  (registers the families' targets)

    class OtherTransformer(torch.nn.Module):
        pass

    backend = create_cache_backend("tea_cache", {})
    with pytest.raises(
        ValueError,
        match=r"no cache target is registered for transformer OtherTransformer; registered transformers: .*Qwen",
    ):
        backend.apply(SimpleNamespace(transformer=OtherTransformer()))


def test_a_subclass_finds_its_base_class_target_and_a_target_without_coefficients_needs_them():
    class Derived(DummyTransformer):
        pass

    assert apply_teacache(Derived(1)).clock.rescaling.coefficients == IDENTITY
    register_cache_target(Derived, CacheTarget(blocks=lambda t: t.transformer_blocks, gate=lambda b, a: a["temb"]))
    with pytest.raises(ValueError, match="tea_cache has no coefficients for transformer Derived"):
        apply_teacache(Derived(1))
    assert apply_teacache(Derived(1), TeaCacheConfig(coefficients=[0, 0, 1, 0, 0])).clock.rescaling(0.5) == 0.25
