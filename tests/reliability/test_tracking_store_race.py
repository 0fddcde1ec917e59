"""Several processes opening one new sqlite MLflow store at the same moment (two sweeps, or the
tasks of a Slurm array, started together on a fresh ``mlflow.db``).

Without the lock of ``delivery.open_client`` this test failed at every try (5 of 5):
MLflow creates a new database's tables by Alembic migrations when the store opens, and the
processes ran them over each other ("table params already exists", "duplicate column name:
step", "Online migration expected to match one row ... in 'alembic_version'")."""
import multiprocessing

from binaryduo.trainer.tracking.delivery import RecordSender

PROCESSES = 4


def _open_and_record(uri: str, barrier, results, index: int) -> None:
    try:
        barrier.wait(timeout=60)
        sender = RecordSender(uri, "binaryduo", journal=None)
        experiment = sender.ensure_experiment()  # opens the store, then races on the create
        run = sender.mlflow.create_run(experiment, run_name=f"process-{index}")
        sender.mlflow.log_metric(run.info.run_id, "val_top1", float(index))
        results.put((index, "ok"))
    except BaseException as error:  # reported to the test, whatever it is
        results.put((index, f"{type(error).__name__}: {' '.join(str(error).split())[:200]}"))


def test_processes_open_one_new_sqlite_store_together(tmp_path):
    import mlflow  # noqa: F401  imported before the fork: the children start the race at once
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    context = multiprocessing.get_context("fork")
    barrier, results = context.Barrier(PROCESSES), context.Queue()
    processes = [context.Process(target=_open_and_record, args=(uri, barrier, results, index))
                 for index in range(PROCESSES)]
    for process in processes:
        process.start()
    outcomes = dict(results.get(timeout=120) for _ in processes)
    for process in processes:
        process.join(timeout=60)
    assert outcomes == {index: "ok" for index in range(PROCESSES)}

    client = MlflowClient(tracking_uri=uri)
    experiments = client.search_experiments()
    assert [e.name for e in experiments].count("binaryduo") == 1
    runs = client.search_runs([client.get_experiment_by_name("binaryduo").experiment_id])
    assert sorted(r.data.metrics["val_top1"] for r in runs) == [0.0, 1.0, 2.0, 3.0]


def test_the_experiment_is_a_training_experiment_new_or_old(tmp_path):
    """MLflow 3's UI opens an experiment by its kind: binaryduo's is created as model training,
    and one made before (no kind) gets the tag; a kind someone set is left alone."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    client.create_experiment("old")
    client.create_experiment("chosen", tags={"mlflow.experimentKind": "genai_development"})
    for name in ("binaryduo", "old", "chosen"):
        RecordSender(uri, name, journal=None).ensure_experiment()
    kinds = {name: client.get_experiment_by_name(name).tags.get("mlflow.experimentKind")
             for name in ("binaryduo", "old", "chosen")}
    assert kinds == {"binaryduo": "custom_model_development", "old": "custom_model_development",
                     "chosen": "genai_development"}
