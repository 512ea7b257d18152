"""Experiment trackers (--report-to): TensorBoard, MLflow, trackio, Weights & Biases, all local.

Each tracker gets what metrics.jsonl gets, at the same step (every number of a record but its step, as
`train/loss`, `eval/val_loss`, ...), the resolved config once, and the training-time samples as text.
Rank 0 only. The trackers are optional packages: check_report_to() names a missing one before anything
loads. A resume continues the same tracker run: its identity is kept in the training state (state()),
and TensorBoard drops the events an interrupted run wrote after the checkpoint (purge_step), the way
metrics.jsonl is cut back. A tracker that fails mid-run is switched off with one warning; training and
metrics.jsonl go on.

Everything is written under --output-dir and nothing contacts a server: MLflow uses a SQLite file there
(unless MLFLOW_TRACKING_URI says otherwise), W&B runs offline (unless WANDB_MODE says otherwise, synced
later with `wandb sync`), trackio keeps its SQLite files in $TRACKIO_DIR (default: --output-dir/trackio).
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import math
import os
import threading
import time
from pathlib import Path

from finetune.core.errors import first_line

log = logging.getLogger("finetune")

# Tracker name -> the module it needs and the package that provides it.
TRACKERS = {"tensorboard": ("tensorboard", "tensorboard"), "mlflow": ("mlflow", "mlflow"),
            "trackio": ("trackio", "trackio"), "wandb": ("wandb", "wandb")}
# What each tracker writes in --output-dir (so --overwrite removes it with the rest of the run).
TRACKER_FILES = ("tensorboard", "mlflow.db", "mlflow-artifacts", "trackio", "wandb")
PROJECT = "finetune"  # MLflow experiment, trackio and W&B project


def parse_report_to(value: str) -> list[str]:
    """`tensorboard,mlflow` -> ["tensorboard", "mlflow"]; `none` -> []."""
    names = [name.strip().lower() for name in value.split(",") if name.strip()]
    return [] if names == ["none"] else list(dict.fromkeys(names))


def check_report_to(value: str) -> list[str]:
    """The problems with a --report-to value: unknown names, packages that are not installed."""
    names = parse_report_to(value)
    if not names and value.strip().lower() != "none":
        return [f"--report-to {value!r} names no tracker; HINT: use none or one or more of "
                f"{', '.join(TRACKERS)}, separated by commas"]
    if "none" in names:  # `none` alongside a tracker: which one did the user mean?
        others = ",".join(name for name in names if name != "none")
        return [f"--report-to {value.strip()!r}: none means no tracker, so it cannot be combined with "
                f"{others}. HINT: use --report-to {others} to log to {'them' if ',' in others else 'it'}, "
                f"or --report-to none for no tracker"]
    problems = []
    for name in names:
        if name not in TRACKERS:
            problems.append(f"--report-to {name!r} is not one of none, {', '.join(TRACKERS)} "
                            f"(HINT: separate several with commas, e.g. --report-to tensorboard,mlflow)")
        elif importlib.util.find_spec(TRACKERS[name][0]) is None:
            problems.append(f"--report-to {name} needs the {TRACKERS[name][1]} package, which is not installed. "
                            f"HINT: pip install {TRACKERS[name][1]}")
        elif name == "mlflow":
            problems += mlflow_server_problems(os.environ.get("MLFLOW_TRACKING_URI", ""))
    return problems


SERVER_PROBE_SECONDS = 5


def mlflow_server_problems(uri: str) -> list[str]:
    """An MLflow tracking server that does not answer, found out in seconds before anything loads (MLflow's
    own client retries for minutes, silently). Only http(s) URIs are servers; files and databases are not."""
    if not uri.lower().startswith(("http://", "https://")):
        return []
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=SERVER_PROBE_SECONDS).close()
    except urllib.error.HTTPError:
        return []  # a server answered (whatever it said about /health)
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        return [f"--report-to mlflow: the tracking server MLFLOW_TRACKING_URI={uri} does not answer ({reason}). "
                f"HINT: start it (`mlflow server --port N`), correct MLFLOW_TRACKING_URI, or unset it to log to "
                f"mlflow.db in --output-dir"]
    return []


# The metrics.jsonl records that go to the trackers: a "resume" record only marks loss.png, since a tracker's
# run is continued itself.
TRACKED_KINDS = ("train", "eval")


def scalars(record: dict) -> dict[str, float]:
    """A metrics.jsonl record as tracker scalars: `{kind}/{field}` for each number in it but the step."""
    return {f"{record['kind']}/{key}": float(value) for key, value in record.items()
            if key not in ("kind", "step") and isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value)}


def flat_params(config: dict) -> dict[str, str | int | float | bool]:
    """Hyperparameters as the trackers take them: lists and None as text."""
    return {key: value if isinstance(value, (str, int, float, bool)) else json.dumps(value)
            for key, value in config.items()}


def samples_text(samples: list[dict]) -> str:
    """The samples of one step as plain text (each text starts with its prompt), a blank line apart."""
    return "\n\n".join(sample["text"] for sample in samples)


# -----------------------------------------------------------------------------
# One class per tracker: open (new or resumed), log a record, log samples, state, close.


class TensorBoard:
    name = "tensorboard"

    def __init__(self, output_dir: Path, config: dict, step: int, saved: dict | None):
        from torch.utils.tensorboard import SummaryWriter

        quiet_tensorboard_writer_threads()
        self.log_dir = output_dir / "tensorboard"  # the same after a resume, even if the folder was moved
        # purge_step: TensorBoard drops the events at or after it that were written before (by an interrupted
        # run after its checkpoint; all of them if this tracker is new, as the run's history is replayed).
        self.writer = SummaryWriter(str(self.log_dir), purge_step=step + 1 if saved else 0)
        if not saved:
            self.writer.add_text("config", "```\n" + json.dumps(config, indent=2) + "\n```", 0)
            write_hparams(self.writer, flat_params(config))

    def log(self, record: dict) -> None:
        for tag, value in scalars(record).items():
            self.writer.add_scalar(tag, value, record["step"])

    def log_samples(self, step: int, samples: list[dict]) -> None:
        self.writer.add_text("samples", "```\n" + samples_text(samples) + "\n```", step)

    def state(self) -> dict:
        return {"log_dir": self.log_dir.name}  # inside --output-dir

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def quiet_tensorboard_writer_threads() -> None:
    """TensorBoard writes its events from a background thread; when a write fails there (a full disk), the
    thread keeps the exception, hands it to the next add_scalar or flush, where Trackers turns it into one
    warning, and then also lets it escape the thread, which prints a 16-line traceback. That second report is
    dropped here; an exception of any other thread is reported as before."""
    previous = threading.excepthook
    if getattr(previous, "quiets_tensorboard", False):
        return

    def excepthook(args):
        if type(args.thread).__name__ == "_AsyncWriterThread" and getattr(args.thread, "exception", None) is not None:
            return  # kept in thread.exception: raised on the next write, one warning there
        previous(args)

    excepthook.quiets_tensorboard = True
    threading.excepthook = excepthook


def write_hparams(writer, params: dict) -> None:
    """The config on TensorBoard's HPARAMS tab, in the run's own log dir (SummaryWriter.add_hparams would
    write it into a new sub-run)."""
    from torch.utils.tensorboard.summary import hparams

    for summary in hparams(params, {"eval/val_loss": 0.0}):
        writer.file_writer.add_summary(summary)


class MLflow:
    name = "mlflow"

    def __init__(self, output_dir: Path, config: dict, step: int, saved: dict | None):
        from mlflow.tracking import MlflowClient

        logging.getLogger("mlflow").setLevel(logging.WARNING)  # its "Creating initial MLflow database tables"
        # A database error (a full disk) is logged by MLflow with its whole traceback, then raised; Trackers
        # reports it in one warning and switches MLflow off, so MLflow's own report is not shown.
        logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
        # A server that stops answering mid-run: seconds of retries, not MLflow's minutes (when not set).
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        # A store of the user's (MLFLOW_TRACKING_URI) is kept in the state; ours is found in --output-dir.
        self.uri = saved["tracking_uri"] if saved else os.environ.get("MLFLOW_TRACKING_URI")
        self.client = MlflowClient(tracking_uri=self.uri or f"sqlite:///{output_dir / 'mlflow.db'}")
        if saved:
            self.run_id = saved["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
            stale = [m.step for m in self.client.get_metric_history(self.run_id, "train/loss") if m.step > step]
            if stale:
                log.warning("MLflow run %s already holds %d train/loss point(s) after step %d from the interrupted "
                            "run; MLflow cannot delete points, so those steps show twice there (metrics.jsonl "
                            "and TensorBoard are cut back to step %d)", self.run_id, len(stale), step, step)
            return
        experiment = self.client.get_experiment_by_name(PROJECT)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(
            PROJECT, artifact_location=(output_dir / "mlflow-artifacts").as_uri())
        self.run_id = self.client.create_run(experiment_id, run_name=output_dir.name).info.run_id
        from mlflow.entities import Param
        self.client.log_batch(self.run_id, params=[Param(k, str(v)) for k, v in flat_params(config).items()])

    def log(self, record: dict) -> None:
        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        metrics = [Metric(key, value, now, record["step"]) for key, value in scalars(record).items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def log_samples(self, step: int, samples: list[dict]) -> None:
        self.client.log_text(self.run_id, samples_text(samples), f"samples/step-{step:06d}.txt")

    def state(self) -> dict:
        return {"run_id": self.run_id, "tracking_uri": self.uri}

    def flush(self) -> None:
        pass  # every call writes through

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


class Trackio:
    name = "trackio"

    def __init__(self, output_dir: Path, config: dict, step: int, saved: dict | None):
        os.environ.setdefault("TRACKIO_DIR", str(output_dir / "trackio"))  # read when trackio is imported
        import trackio

        self.run_name = saved["run_name"] if saved else f"{output_dir.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        self.run = trackio.init(project=PROJECT, name=self.run_name, config=None if saved else config,
                                resume="must" if saved else "never", embed=False, auto_log_gpu=False,
                                auto_log_cpu=False)

    def log(self, record: dict) -> None:
        self.run.log(scalars(record), step=record["step"])

    def log_samples(self, step: int, samples: list[dict]) -> None:
        import trackio

        table = trackio.Table(columns=["prompt", "text"], data=[[s["prompt"], s["text"]] for s in samples])
        self.run.log({"samples": table}, step=step)

    def state(self) -> dict:
        return {"run_name": self.run_name}

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.run.finish()


class WandB:
    name = "wandb"

    def __init__(self, output_dir: Path, config: dict, step: int, saved: dict | None):
        import wandb

        self.wandb = wandb
        self.run = wandb.init(project=PROJECT, name=output_dir.name, dir=str(output_dir),
                              id=saved["run_id"] if saved else None, resume="allow" if saved else None,
                              mode=os.environ.get("WANDB_MODE", "offline"), config=None if saved else config,
                              settings=wandb.Settings(console="off", silent=True))

    def log(self, record: dict) -> None:
        self.run.log(scalars(record), step=record["step"])

    def log_samples(self, step: int, samples: list[dict]) -> None:
        table = self.wandb.Table(columns=["prompt", "text"], data=[[s["prompt"], s["text"]] for s in samples])
        self.run.log({"samples": table}, step=step)

    def state(self) -> dict:
        return {"run_id": self.run.id}

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.run.finish()


OPENERS = {"tensorboard": TensorBoard, "mlflow": MLflow, "trackio": Trackio, "wandb": WandB}


# -----------------------------------------------------------------------------
# All of a run's trackers, each switched off at its first failure


class Trackers:
    """The trackers of a run (none on ranks other than 0). Every call reaches each tracker that still works;
    the first exception of a tracker is one warning and switches that tracker off."""

    def __init__(self, trackers: list | None = None, saved: dict | None = None):
        self.active = list(trackers or [])
        self.saved = dict(saved or {})  # the state of trackers this run does not use, kept for a later resume

    def _each(self, what: str, call) -> None:
        for tracker in list(self.active):
            try:
                call(tracker)
            except Exception as exc:  # a tracker's own errors (disk, database, server) must not stop training
                self.active.remove(tracker)
                self.saved[tracker.name] = tracker.state()  # a resume continues its run (TensorBoard: purged)
                with contextlib.suppress(Exception):  # keep what it holds so far, if it still can
                    tracker.close()
                log.warning("--report-to %s: %s failed (%s: %s); reporting to it stops here, training and "
                            "metrics.jsonl go on", tracker.name, what, type(exc).__name__, first_line(exc))

    def log(self, record: dict) -> None:
        if record["kind"] in TRACKED_KINDS:
            self._each(f"logging step {record['step']}", lambda t: t.log(record))

    def log_samples(self, step: int, samples: list[dict]) -> None:
        self._each(f"logging the samples of step {step}", lambda t: t.log_samples(step, samples))

    def flush(self) -> None:
        self._each("flushing", lambda t: t.flush())

    def state(self) -> dict:
        """What a resume needs to continue the same tracker runs (kept in the training state)."""
        return {**self.saved, **{t.name: t.state() for t in self.active}}

    def close(self) -> None:
        self._each("closing", lambda t: t.close())
        self.active = []


def open_trackers(names: list[str], output_dir: Path, config: dict, step: int, saved: dict | None,
                  history: list[dict], is_main: bool) -> Trackers:
    """Open the trackers of --report-to. `saved`: the tracker state of the checkpoint resumed from (None for a
    new run); `history`: metrics.jsonl as kept up to `step`, replayed into a tracker that this run adds."""
    saved = saved or {}
    if not is_main:
        return Trackers()
    opened = []
    for name in names:
        try:
            tracker = OPENERS[name](output_dir, config, step, saved.get(name))
        except Exception as exc:
            log.warning("--report-to %s: could not start it (%s: %s); training goes on without it",
                        name, type(exc).__name__, first_line(exc))
            continue
        opened.append(tracker)
        log.info("reporting to %s%s", name, " (continuing its run)" if name in saved else "")
    trackers = Trackers(opened, {name: s for name, s in saved.items() if name not in names})
    added = {t.name for t in opened} - set(saved)
    for record in (r for r in history if r["kind"] in TRACKED_KINDS):  # a tracker this resume adds gets them too
        trackers._each(f"logging step {record['step']}", lambda t: t.log(record) if t.name in added else None)  # noqa: B023
    return trackers
