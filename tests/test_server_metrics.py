"""/metrics: denoising steps by what the cache did, cache backend and CFG branch, with bounded labels."""

from types import SimpleNamespace

from teaserve.engine import PromptEmbeddingCache, RequestMetrics, RequestOutput
from teaserve.server.metrics import MAX_BRANCH_LABELS, ServerMetrics

IDLE_ENGINE = SimpleNamespace(
    queue_depth=0, num_running=0, seconds_since_progress=None, prompt_cache=PromptEmbeddingCache(0)
)


def output(cache=None, transformer_calls=0) -> RequestOutput:
    metrics = RequestMetrics(0.0, 1.0, 4, 4, transformer_calls, cache=cache)
    return RequestOutput("id", "x", [], 0, [0], 8, 8, metrics)


def steps(metrics: ServerMetrics, kind: str, backend: str, branch: str) -> float:
    labels = {"kind": kind, "backend": backend, "branch": branch}
    return metrics.registry.get_sample_value("teaserve_denoising_steps_total", labels) or 0.0


def branch(computed: int, skipped: int) -> dict:
    return {"computed_steps": computed, "skipped_steps": skipped, "schedule": "C" * computed + "S" * skipped}


def test_steps_are_counted_per_backend_and_branch():
    metrics = ServerMetrics(IDLE_ENGINE)
    cache = {
        "backend": "tea_cache",
        "enabled": True,
        "computed_steps": 5,
        "skipped_steps": 3,
        "branches": {"cond": branch(2, 2), "uncond": branch(3, 1)},
    }
    metrics.record_output(output(cache, transformer_calls=8))
    metrics.record_output(output(cache, transformer_calls=8))
    metrics.record_output(output({**cache, "enabled": False, "branches": {}}, transformer_calls=8))
    metrics.record_output(output(None, transformer_calls=4))
    metrics.record_output(output({**cache, "backend": "other_cache", "branches": {}}))
    assert steps(metrics, "computed", "tea_cache", "cond") == 4 and steps(metrics, "skipped", "tea_cache", "cond") == 4
    assert steps(metrics, "computed", "tea_cache", "uncond") == 6
    assert steps(metrics, "skipped", "tea_cache", "uncond") == 2
    assert steps(metrics, "computed", "tea_cache", "all") == 8  # disabled per request: every call computed
    assert steps(metrics, "computed", "none", "all") == 4
    assert steps(metrics, "computed", "other_cache", "all") == 5  # no branches reported: the totals
    assert steps(metrics, "skipped", "other_cache", "all") == 3


def test_branch_labels_are_bounded():
    metrics = ServerMetrics(IDLE_ENGINE)
    names = [f"call{index}" for index in range(MAX_BRANCH_LABELS + 3)]
    cache = {"backend": "tea_cache", "enabled": True, "computed_steps": 0, "skipped_steps": 0}
    metrics.record_output(output({**cache, "branches": {name: branch(1, 1) for name in names}}))
    metrics.record_output(output({**cache, "branches": {names[0]: branch(1, 0), names[-1]: branch(1, 0)}}))
    text = metrics.render().decode()
    series = {line.split("{")[1].split("}")[0] for line in text.splitlines() if line.startswith("teaserve_denoising")}
    branches = {labels.split('branch="')[1].split('"')[0] for labels in series}
    assert branches == {*names[:MAX_BRANCH_LABELS], "other"}
    assert steps(metrics, "computed", "tea_cache", "other") == 3 + 1  # all three beyond the cap, then the last again
    assert steps(metrics, "computed", "tea_cache", names[0]) == 2


def test_each_answered_request_records_the_size_of_its_batch():
    metrics = ServerMetrics(IDLE_ENGINE)
    for batch_size in (1, 3, 3, 3):
        answered = output()
        answered.metrics.batch_size = batch_size
        metrics.record_output(answered)
    sample = metrics.registry.get_sample_value
    assert sample("teaserve_request_batch_size_count") == 4 and sample("teaserve_request_batch_size_sum") == 10
    assert sample("teaserve_request_batch_size_bucket", {"le": "2.0"}) == 1
