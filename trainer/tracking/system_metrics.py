"""System metrics of a training (CPU, memory, disk, network; GPU where NVML answers), sampled by
rank 0 in a small background thread and logged through the :class:`~.tracker.Tracker` under
MLflow's own names (``system/cpu_utilization_percentage``, ``system/system_memory_usage_megabytes``,
``system/gpu_0_utilization_percentage``, ...), so MLflow's "System metrics" tab shows them.

MLflow's ``SystemMetricsMonitor`` (``log_system_metrics=True``) sends from its thread straight to
the server: it needs a real run id, loses its records while the server is away and cannot work
``--offline``. Its collectors are reused here (``mlflow.system_metrics.metrics``: ``CPUMonitor``,
``DiskMonitor``, ``NetworkMonitor``, and ``GPUMonitor`` when NVML answers (``nvidia-ml-py``, a
dependency, and an NVIDIA driver), else ``ROCMMonitor`` for AMD); their averages go through the journal like every
other record (placeholder run ids, outage, replay).

- **Where**: every point to the parent run (the whole job, one continuous series) and, while a
  stage runs (from its start, through the transition check, training and evaluation, to its final
  record), the same point to that stage's run too: each run's System metrics tab shows its own
  time. (Two journal records per point; at the default interval a negligible cost.)
- **When**: ``SAMPLES_PER_LOG`` samples per ``logging.system_metrics_interval_s`` (default 10 s),
  their average logged once per interval (MLflow's ``samples_before_logging``); a switch of run
  and the stop take a last sample (unless one was just taken) and log what was collected, so a
  stage gets a point however short.
  Steps count the points of each run (0, 1, ...); a resumed run continues after the last step
  its journal holds.
- **Which process**: rank 0 only (its Tracker is the enabled one); NVML reports every GPU of rank
  0's node, so on one node that covers every rank. Other nodes are not sampled.
- **Never in the way**: the thread only reads operating-system counters (no torch calls, no
  collectives, so seeded runs stay bitwise identical); any exception stops it with one warning
  line and training goes on; ``stop`` waits at most ``STOP_WAIT_S`` for it.
"""
from __future__ import annotations

import sys
import threading
import time
from contextlib import contextmanager

#: MLflow's prefix: its UI's "System metrics" tab shows the metrics named ``system/...``
PREFIX = "system/"
SAMPLES_PER_LOG = 5
#: A sample closer than this to the previous one is not taken (CPU utilisation is measured
#: between two samples: over a few milliseconds it reads 0 or 100)
MIN_SAMPLE_GAP_S = 0.1
STOP_WAIT_S = 30.0


def default_monitors(gpu_expected: bool = False) -> list:
    """MLflow's collectors for this machine: CPU and memory, disk, network, and the GPUs when a
    monitor for them can start (a note when ``gpu_expected`` and none can)."""
    from mlflow.system_metrics.metrics.cpu_monitor import CPUMonitor
    from mlflow.system_metrics.metrics.disk_monitor import DiskMonitor
    from mlflow.system_metrics.metrics.network_monitor import NetworkMonitor

    monitors = [CPUMonitor(), DiskMonitor(), NetworkMonitor()]
    problems = []
    try:
        import pynvml  # noqa: F401  (gpu_monitor looks for it in sys.modules)
        from mlflow.system_metrics.metrics.gpu_monitor import GPUMonitor

        monitors.append(GPUMonitor())
    except Exception as error:  # noqa: BLE001 - no NVML, no NVIDIA GPU: try AMD's
        problems.append(f"NVIDIA: {type(error).__name__}: {error}")
        try:
            from mlflow.system_metrics.metrics.rocm_monitor import ROCMMonitor

            monitors.append(ROCMMonitor())
        except Exception as rocm_error:  # noqa: BLE001
            problems.append(f"AMD: {type(rocm_error).__name__}: {rocm_error}")
            if gpu_expected:
                _say(f"binaryduo: note: no GPU system metrics ({'; '.join(problems)})")
    return monitors


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class SystemMetrics:
    """The sampler of one training process; every method is a no-op when it is not enabled
    (sampling switched off, or a rank whose Tracker is disabled)."""

    def __init__(self, tracker, interval_s: float, *, enabled: bool = True,
                 gpu_expected: bool = False, monitors: list | None = None):
        self.tracker, self.interval_s = tracker, float(interval_s)
        self.enabled = bool(enabled and tracker is not None and tracker.enabled)
        self.gpu_expected = gpu_expected
        self.monitors = monitors
        self._parent: str | None = None
        self._run_id: str | None = None  # the stage run that is running, if any
        self._next_run_id: str | None = None
        self._steps: dict[str, int] = {}
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        #: what the thread cost: samples taken, points logged, its own CPU seconds
        self.samples = self.points = 0
        self.cpu_seconds = 0.0
        self.failure: str | None = None
        self._last_sample = 0.0

    @classmethod
    def for_recipe(cls, logging, tracker, *, gpu_expected: bool = False) -> SystemMetrics:
        """From the recipe's ``logging`` section (``system_metrics``, its interval)."""
        return cls(tracker, logging.system_metrics_interval_s, enabled=logging.system_metrics,
                   gpu_expected=gpu_expected)

    # ------------------------------------------------------------------ the runner's calls
    def start(self, run_id: str | None) -> None:
        """Starts sampling into ``run_id`` (the parent run)."""
        if not self.enabled or self._thread is not None or run_id is None:
            return
        try:
            if self.monitors is None:
                self.monitors = default_monitors(self.gpu_expected)
            import psutil

            psutil.cpu_percent()  # the first call only sets the reference point: returns 0.0
            self._last_sample = time.monotonic()
        except Exception as error:  # noqa: BLE001 - no system metrics, training goes on
            self._fail(error)
            return
        self._parent, self._run_id = run_id, None
        self._stopping.clear()
        self._thread = threading.Thread(target=self._loop, name="binaryduo-system-metrics",
                                        daemon=True)
        self._thread.start()

    def follow(self, run_id: str | None) -> None:
        """From now on also into ``run_id`` (a stage's run; the parent's: no stage any more); what
        was sampled so far goes where it was going."""
        if self._thread is None or run_id is None:
            return
        with self._lock:
            self._next_run_id = run_id
        self._wake.set()

    def stop(self) -> None:
        """The last sample and point, then the thread ends (waited for at most STOP_WAIT_S)."""
        thread = self._thread
        if thread is None:
            return
        self._stopping.set()
        self._wake.set()
        thread.join(STOP_WAIT_S)
        if thread.is_alive():
            _say(f"binaryduo: warning: system metrics sampler still busy after {STOP_WAIT_S:.0f} "
                 f"s (a slow tracking server?); left behind")
        self._thread = None

    @contextmanager
    def sampling(self, run_id: str | None):
        """``start(run_id)`` ... ``stop()``, whatever ends the block (failure, preemption)."""
        self.start(run_id)
        try:
            yield self
        finally:
            self.stop()

    # ------------------------------------------------------------------ the thread
    def _loop(self) -> None:
        started = time.thread_time()
        period = self.interval_s / SAMPLES_PER_LOG
        next_point = time.monotonic() + self.interval_s
        try:
            while True:
                self._wake.wait(period)  # a sampling period, or woken by follow / stop
                self._wake.clear()
                self._sample()
                with self._lock:
                    switch, self._next_run_id = self._next_run_id, None
                stopping = self._stopping.is_set()
                if switch is not None or stopping or time.monotonic() >= next_point:
                    self._publish()
                    next_point = time.monotonic() + self.interval_s
                if switch is not None:
                    self._run_id = None if switch == self._parent else switch
                if stopping:
                    return
        except Exception as error:  # noqa: BLE001 - one warning, the thread ends, training goes on
            self._fail(error)
        finally:
            self.cpu_seconds += time.thread_time() - started

    def _sample(self) -> None:
        if time.monotonic() - self._last_sample < MIN_SAMPLE_GAP_S:
            return
        self._last_sample = time.monotonic()
        for monitor in self.monitors:
            monitor.collect_metrics()
        self.samples += 1

    def _publish(self) -> None:
        metrics = {}
        for monitor in self.monitors:
            metrics.update(monitor.aggregate_metrics())
            monitor.clear_metrics()
        if not metrics:
            return
        for run_id in (self._parent, self._run_id):
            if run_id is None:
                continue
            if run_id not in self._steps:  # a resumed run continues after its last point
                last = self.tracker.last_step(run_id, PREFIX)
                self._steps[run_id] = 0 if last is None else last + 1
            self.tracker.log_metrics(run_id, {PREFIX + k: v for k, v in metrics.items()},
                                     step=self._steps[run_id])
            self._steps[run_id] += 1
        self.points += 1

    def _fail(self, error: BaseException) -> None:
        self.failure = f"{type(error).__name__}: {' '.join(str(error).split())[:200]}"
        _say(f"binaryduo: warning: system metrics stopped ({self.failure}); training goes on")
