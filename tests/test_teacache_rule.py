"""TeaCache's skip rule and hooks on dummy blocks whose arithmetic is exact.

Each dummy block returns (encoder + 1, 2 * hidden), so a stack of N blocks maps x to 2**N * x with the residual
(2**N - 1) * x; the gate signal is the `temb` argument itself, so a test chooses the relative L1 changes exactly.
"""

from types import SimpleNamespace

import pytest
import torch
from diffusers.hooks._helpers import TransformerBlockMetadata, TransformerBlockRegistry
from diffusers.models.cache_utils import CacheMixin

from teaserve.cache import create_cache_backend
from teaserve.cache.teacache import TEACACHE_MODELS, BranchStats, TeaCacheConfig, TeaCacheModel, TeaCachePolicy

IDENTITY = (0.0, 0.0, 0.0, 1.0, 0.0)


class DummyBlock(torch.nn.Module):
    def forward(self, hidden_states, encoder_hidden_states, temb):
        return encoder_hidden_states + 1, hidden_states * 2


class DummyTransformer(CacheMixin, torch.nn.Module):
    def __init__(self, num_blocks: int):
        super().__init__()
        self.transformer_blocks = torch.nn.ModuleList(DummyBlock() for _ in range(num_blocks))

    def forward(self, hidden_states, temb):
        encoder_hidden_states = torch.zeros(1)
        for block in self.transformer_blocks:
            encoder_hidden_states, hidden_states = block(
                hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states, temb=temb
            )
        return hidden_states


@pytest.fixture(autouse=True)
def dummy_registered():
    TransformerBlockRegistry.register(
        model_class=DummyBlock,
        metadata=TransformerBlockMetadata(return_hidden_states_index=1, return_encoder_hidden_states_index=0),
    )
    TEACACHE_MODELS["DummyTransformer"] = TeaCacheModel(
        blocks=lambda transformer: list(transformer.transformer_blocks),
        gate=lambda block, arguments: arguments["temb"],
        coefficients=IDENTITY,
    )
    yield
    del TEACACHE_MODELS["DummyTransformer"]


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


def test_negative_polynomial_values_are_clamped_at_zero():
    # f(x) = x - 0.3 is negative for every change of 0.25: nothing accumulates; each 0.5 change adds 0.2
    gates = gates_from_changes([0.25, 0.25, 0.5, 0.25, 0.5, 0.25])
    _, stats = run({"rel_l1_thresh": 0.3, "coefficients": [0, 0, 0, 1, -0.3]}, {"cond": gates})
    branch = stats["branches"]["cond"]
    assert branch["accumulated"] == pytest.approx([0.0, 0.0, 0.0, 0.2, 0.2, 0.4, 0.0])
    assert branch["schedule"] == "CSSSSCC"


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
    policy = TeaCachePolicy(TeaCacheConfig(rel_l1_thresh=0.3), coefficients=IDENTITY)
    stats = BranchStats()
    decisions = [policy.should_compute(r, i, 5, stats) for i, r in enumerate([None, 0.1, 0.1, 0.2, 0.1])]
    assert decisions == [True, False, False, True, True]


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"rel_l1_thresh": 0}, r"rel_l1_thresh must be a number > 0"),
        ({"rel_l1_thresh": "0.2"}, r"rel_l1_thresh must be a number > 0"),
        ({"coefficients": [1, 2, 3]}, r"coefficients must be a list of 5 numbers"),
        ({"max_consecutive_skips": 0}, r"max_consecutive_skips must be an integer >= 1"),
        (
            {"threshold": 0.2},
            r"unknown tea_cache setting\(s\) \['threshold'\]; valid keys: rel_l1_thresh, coefficients",
        ),
    ],
)
def test_bad_config_names_the_valid_keys(config, message):
    with pytest.raises(ValueError, match=message):
        create_cache_backend("tea_cache", config)


def test_bad_overrides_are_refused():
    backend = create_cache_backend("tea_cache", {})
    with pytest.raises(ValueError, match=r"valid keys: enabled, rel_l1_thresh"):
        backend.check_overrides({"thresh": 1})
    with pytest.raises(ValueError, match=r"'enabled' must be true or false"):
        backend.check_overrides({"enabled": "no"})


def test_unsupported_transformer_fails_at_apply():
    class OtherTransformer(torch.nn.Module):
        pass

    backend = create_cache_backend("tea_cache", {})
    with pytest.raises(
        ValueError, match=r"does not support transformer OtherTransformer; supported transformers: .*Qwen"
    ):
        backend.apply(SimpleNamespace(transformer=OtherTransformer()))
