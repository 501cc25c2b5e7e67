"""metrics.jsonl as a kill or a diverged run leaves it (issue 19): a torn last line is dropped with a warning
naming the file, and NaN/Inf are written as null so the file stays strict JSON for other tools."""
import json
import logging

import pytest

from siglip_jax.training import metrics


def _strict(line: str) -> dict:
    def refuse(constant):
        raise ValueError(f"non-JSON constant {constant}")

    return json.loads(line, parse_constant=refuse)


@pytest.mark.parametrize("keep_through_step", [3, None])
def test_torn_last_line_is_dropped_with_a_warning_naming_the_file(tmp_path, caplog, keep_through_step):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (1, 2, 3)) + '{"step": 4, "lo')
    with caplog.at_level(logging.WARNING):
        writer = metrics.JsonlWriter(str(path), keep_through_step=keep_through_step)
    assert f"Dropped line 4 of {path}" in caplog.text
    writer.write(4, {"loss": 0.5})
    assert [_strict(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3, 4]


def test_nan_and_inf_are_written_as_null(tmp_path):
    path = tmp_path / "metrics.jsonl"
    writer = metrics.JsonlWriter(str(path))
    writer.write(1, {"loss": float("nan"), "grad_norm": float("inf"), "bias": -float("inf"), "temperature": 10.0})
    assert [_strict(line) for line in path.read_text().splitlines()] == [
        {"step": 1, "loss": None, "grad_norm": None, "bias": None, "temperature": 10.0}]


def test_an_old_file_with_nan_literals_is_rewritten_strict_on_resume(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": NaN}\n{"step": 2, "loss": 1.0}\n{"step": 3, "loss": 2.0}\n')
    metrics.JsonlWriter(str(path), keep_through_step=2)
    assert [_strict(line) for line in path.read_text().splitlines()] == [{"step": 1, "loss": None}, {"step": 2, "loss": 1.0}]


def test_plot_reads_nulls_and_torn_lines(tmp_path):
    from tools import plot

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": null}\n{"step": 3, "loss": 1.0}\n{"step": 4, "lo')
    records = plot.read_metrics(str(path))
    assert [record["loss"] for record in records] == [2.0, None, 1.0]
    assert plot.plot(records, str(tmp_path / "curves.png")) == ["loss"]
