"""RunLogger: the one writer of a run's metrics, used by trials and by evaluation actors alike."""

from mlflow.tracking import MlflowClient

from ditsweep.tracking.run_logger import RunLogger


def _history(client, run_id, key):
    return [(m.step, m.value) for m in client.get_metric_history(run_id, key)]


def test_a_second_writer_skips_the_steps_already_in_mlflow(tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = client.create_run(client.create_experiment("x")).info.run_id
    first = RunLogger(client, run_id)
    for step in (10, 20, 30):
        first.add({"loss": step / 100}, step)
    assert first.send() == 3

    # A restarted trial (or a re-run evaluation) replays steps 20 and 30, then goes on.
    again = RunLogger(MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}"), run_id)
    for step in (20, 30, 40):
        again.add({"loss": 9.0, "psnr_gap_mean": step}, step)
    assert again.send() == 4  # loss@40 and psnr_gap_mean@20,30,40
    assert sorted(_history(client, run_id, "loss")) == [(10, 0.1), (20, 0.2), (30, 0.3), (40, 9.0)]
    assert [s for s, _ in sorted(_history(client, run_id, "psnr_gap_mean"))] == [20, 30, 40]

    # Within one writer a step sent once is never sent again either.
    again.add({"loss": 7.0}, 40)
    assert again.send() == 0
    assert len(_history(client, run_id, "loss")) == 4


def test_values_stay_queued_when_mlflow_is_unreachable(monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    client = MlflowClient("http://127.0.0.1:9")  # nothing listens on the discard port
    logger = RunLogger(client, "0" * 32)
    logger.add({"loss": 1.0}, 1)
    try:
        logger.send(attempts=1)
    except Exception:
        pass
    else:
        raise AssertionError("send to an unreachable server must raise")
    assert logger.pending == {("loss", 1): 1.0}
