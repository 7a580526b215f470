"""Job manifests (issue 15): stable ids, strict checks before anything is submitted, and
a batch run once however often it is submitted (real dispatcher, real NATS and Docker)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import nats
import pytest

from dispatcher.config import Config
from ktrdr_run.manifest import ManifestError, load_manifest
from tests.conftest import RunningDispatcher, run_cli, write_config

HOLDS = [0.0, 0.1, 0.2]
TICKS = [0.1, 0.2, 0.3, 0.4]


def grid_entries(edited: bool = False) -> str:
    """12 [[jobs]] entries, a 3 x 4 grid of probe params (the last one edited if asked)."""
    text = ""
    for hold in HOLDS:
        for tick in TICKS:
            last = hold == HOLDS[-1] and tick == TICKS[-1]
            text += (
                f'[[jobs]]\nname = "h{hold}-t{tick}"\nkind = "probe"\n'
                f"params = {{ hold_s = {hold + (0.05 if edited and last else 0.0)}, tick_s = {tick} }}\n"
                "resources = { cpus = 0.1, memory_gb = 0.125 }\n\n"
            )
    return text


def test_a_matrix_expands_to_the_ids_of_the_same_jobs_written_out(tmp_path: Path) -> None:
    matrix = tmp_path / "matrix.toml"
    matrix.write_text(
        '[[jobs]]\nkind = "probe"\nparams = { fail = false }\n'
        f"matrix = {{ hold_s = {HOLDS}, tick_s = {TICKS} }}\n"
    )
    written = tmp_path / "written.toml"
    written.write_text(
        "".join(
            f'[[jobs]]\nkind = "probe"\nparams = {{ fail = false, hold_s = {h}, tick_s = {t} }}\n'
            for h in HOLDS
            for t in TICKS
        )
    )
    expanded = load_manifest(matrix)
    assert len(expanded) == 12 and len({p.job.job_id for p in expanded}) == 12
    assert [p.job.job_id for p in expanded] == [p.job.job_id for p in load_manifest(written)]
    assert [p.job.job_id for p in load_manifest(matrix)] == [p.job.job_id for p in expanded]  # stable
    assert expanded[0].label == "probe#0 [hold_s=0.0, tick_s=0.1]"
    # labels are not part of the id: relabelling runs nothing new
    relabelled = tmp_path / "relabelled.toml"
    relabelled.write_text(matrix.read_text() + 'labels = { team = "quant" }\n')
    assert [p.job.job_id for p in load_manifest(relabelled)] == [p.job.job_id for p in expanded]


@pytest.mark.parametrize(
    ("text", "said"),
    [
        ('[[jobs]]\nkind = "probe"\nsize = 3\n', "jobs[0]: Object contains unknown field `size`"),
        ('[[jobs]]\nkind = "probe"\nrepeat = "twice"\n', "jobs[0].repeat: Expected `int`, got `str`"),
        (
            '[[jobs]]\nname = "a"\nkind = "probe"\n[[jobs]]\nname = "a"\nkind = "probe"\n',
            "jobs[1] (a): name 'a' is used by jobs[0] too",
        ),
        (
            '[[jobs]]\nname = "x"\nkind = "nosuch"\n',
            "jobs[0] (x): kind: unknown kind 'nosuch'; known kinds: backtest, probe",
        ),
        (
            '[[jobs]]\nkind = "probe"\nmatrix = { hold_s = [1, "long"] }\n',
            "jobs[0] [hold_s=long]: invalid params for 'probe': params.hold_s: Expected `float`, got `str`",
        ),
        (
            '[[jobs]]\nkind = "probe"\nresources = { hosts = "a" }\n',
            "jobs[0].resources.hosts: Expected `array`",
        ),
        ("jobs = []\n", "jobs: Expected `array` of length >= 1"),
    ],
)
def test_bad_manifests_name_the_entry_and_field(tmp_path: Path, text: str, said: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ManifestError) as caught:
        load_manifest(path)
    assert said in str(caught.value), str(caught.value)


async def ops_with_label(url: str) -> dict[str, dict[str, object]]:
    nc = await nats.connect(url)
    kv = await nc.jetstream().key_value("ktrdr_ops")
    records = {}
    for key in await kv.keys():
        entry = await kv.get(key)
        record = json.loads(entry.value or b"{}")
        if "manifest.entry" in record.get("labels", {}):
            records[record["op_id"]] = record
    await nc.close()
    return records


async def test_a_manifest_submitted_twice_runs_once_and_an_edit_runs_one_more(
    config: Config, dispatcher: RunningDispatcher, tmp_state: Path
) -> None:
    config_path = write_config(config, tmp_state / "ktrdr-run.toml")
    manifest = tmp_state / "batch.toml"
    manifest.write_text(grid_entries())

    first = await asyncio.to_thread(
        run_cli, ["submit", "--manifest", str(manifest), "--json"], config_path, 300
    )
    assert first.returncode == 0, first.stderr
    ops = json.loads(first.stdout)["ops"]
    assert len(ops) == 12 and {o["state"] for o in ops} == {"completed"}
    again = await asyncio.to_thread(run_cli, ["submit", "--manifest", str(manifest)], config_path, 300)
    assert again.returncode == 0, again.stderr
    assert "12 job(s), 0 submitted, 12 already there" in again.stderr
    records = await ops_with_label(config.nats.url)
    assert len(records) == 12 and {r["attempts"] for r in records.values()} == {1}

    manifest.write_text(grid_entries(edited=True))
    edited = await asyncio.to_thread(run_cli, ["submit", "--manifest", str(manifest)], config_path, 300)
    assert edited.returncode == 0, edited.stderr
    assert "12 job(s), 1 submitted, 11 already there" in edited.stderr
    records = await ops_with_label(config.nats.url)
    assert len(records) == 13

    status = await asyncio.to_thread(run_cli, ["manifest", "status", str(manifest), "--json"], config_path)
    assert status.returncode == 0, status.stderr
    rows = json.loads(status.stdout)["ops"]
    assert [r["op_id"] for r in rows] == [p.job.job_id for p in load_manifest(manifest)]
    for row in rows:  # matches the op records
        record = records[row["op_id"]]
        assert (row["state"], row["host"], row["attempts"]) == (
            record["state"],
            record["host"],
            record["attempts"],
        )
        assert record["labels"]["manifest.entry"] == row["entry"]
