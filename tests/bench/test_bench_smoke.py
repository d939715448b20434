"""Every bench's `--smoke` mode runs from a plain source tree, as its docstring says (`PYTHONPATH=src python
bench/X.py --smoke`), in a fresh process without the test suite's imports. Nothing about speed is asserted: a
smoke run checks that every code path of the bench still runs and prints its figures."""

from __future__ import annotations

from pathlib import Path

import pytest

from _run import BENCHES, REPO, run_bench

# bench -> what its smoke run prints (a figure line of each part); gpu, pretrain and precision have their own tests
# (tests/bench/test_gpu_smoke.py, tests/ssl/test_bench_pretrain.py) that read their JSON figures.
EXPECT = {
    "adapt": ["cache build (one-off)", "[linear] 13-lr grid", "[glori] epoch from cache"],
    "calibration_ci": ["ece            percentile widened to the estimate", "test sets x 200 resamples in"],
    "backbone": ["ours packed (oneDNN, folded)", "matmul peak (256^3 GEMM", "summary (ratio"],
    "curate": ["in-process (reference)", "2 worker process(es)", "cxr-like candidates grow"],
    "evaluate": ["speed-up:", "max |difference| on shared resamples"],
    "io": ["PNG 8-bit 1024 px (NIH)", "DICOM JPEG 2000 lossless", "slowest format"],
    "serve": ["HTTP POST /v1/predict", "onnxruntime vs PyTorch"],
    "serve_memory": ["server idle RSS", "peak RSS with the limits"],
}
NEEDS_DATA = {"adapt", "curate", "io", "serve", "serve_memory"}
OWN_TEST = {"gpu": "tests/bench/test_gpu_smoke.py", "pretrain": "tests/ssl/test_bench_pretrain.py",
            "precision": "tests/bench/test_precision_smoke.py"}


def test_every_bench_has_a_smoke_test() -> None:
    assert set(BENCHES) == set(EXPECT) | set(OWN_TEST)
    for name in BENCHES:
        text = (REPO / "bench" / f"{name}.py").read_text()
        assert "--smoke" in text.split('"""')[1], f"bench/{name}.py: its docstring does not show --smoke"
        assert "from _timing import" in text, f"bench/{name}.py does not time with bench/_timing.py"
    for path in OWN_TEST.values():
        assert "run_bench" in (REPO / path).read_text()


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(EXPECT))
def test_bench_smoke_runs_from_the_source_tree(name: str, request: pytest.FixtureRequest) -> None:
    data: Path | None = request.getfixturevalue("data_root") if name in NEEDS_DATA else None
    r = run_bench(name, "--smoke", data=data)
    for line in EXPECT[name]:
        assert line in r.stdout, f"bench/{name}.py --smoke printed no {line!r}:\n{r.stdout[-2000:]}"
