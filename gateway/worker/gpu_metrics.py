"""Per-device GPU utilisation and memory on the worker's /metrics, read through NVML.

nvidia-ml-py (the `gpu` extra) reads them at scrape time, for the devices this
worker may use (its CUDA_VISIBLE_DEVICES, by index or UUID; every device when
unset). Without the package, or without a driver, nothing is exported and
nothing fails.
"""
from __future__ import annotations

import logging
import os

from prometheus_client.core import REGISTRY, GaugeMetricFamily

log = logging.getLogger("infergate.worker")


def _handles(pynvml) -> list[tuple[str, object]]:
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is None:
        ids = [str(i) for i in range(pynvml.nvmlDeviceGetCount())]
    else:
        ids = [d.strip() for d in listed.split(",") if d.strip()]
    handles = []
    for device in ids:
        try:
            if device.isdigit():
                handles.append((device, pynvml.nvmlDeviceGetHandleByIndex(int(device))))
            else:
                handles.append((device, pynvml.nvmlDeviceGetHandleByUUID(device)))
        except pynvml.NVMLError:
            pass  # CUDA stops at the first device it cannot use; so do we
    return handles


class GpuCollector:
    def __init__(self, pynvml, handles):
        self.nvml = pynvml
        self.handles = handles

    def collect(self):
        util = GaugeMetricFamily("infergate_gpu_utilization_ratio",
                                 "Share of the last sample period the GPU was busy", labels=["device"])
        used = GaugeMetricFamily("infergate_gpu_memory_used_bytes", "GPU memory in use",
                                 labels=["device"])
        total = GaugeMetricFamily("infergate_gpu_memory_total_bytes", "GPU memory",
                                  labels=["device"])
        for device, handle in self.handles:
            try:
                rates = self.nvml.nvmlDeviceGetUtilizationRates(handle)
                memory = self.nvml.nvmlDeviceGetMemoryInfo(handle)
            except self.nvml.NVMLError:
                continue
            util.add_metric([device], rates.gpu / 100.0)
            used.add_metric([device], memory.used)
            total.add_metric([device], memory.total)
        return [util, used, total]


def register() -> GpuCollector | None:
    """Export the visible GPUs' gauges; None where NVML cannot be read."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        handles = _handles(pynvml)
    except pynvml.NVMLError as exc:
        log.debug("no GPU metrics: %s", exc)
        return None
    if not handles:
        return None
    collector = GpuCollector(pynvml, handles)
    REGISTRY.register(collector)
    log.info("GPU metrics for device(s) %s", ", ".join(d for d, _ in handles))
    return collector
