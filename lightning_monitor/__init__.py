"""lightning-monitor: live training monitors for PyTorch Lightning, in TensorBoard and Weights & Biases at once."""

from lightning_monitor._core.warn import install_warning_format
from lightning_monitor.activation_monitor import ActivationMonitor
from lightning_monitor.gradient_monitor import GradientMonitor
from lightning_monitor.health_monitor import HealthMonitor
from lightning_monitor.memory_monitor import MemoryMonitor
from lightning_monitor.multi_logger import MultiLogger
from lightning_monitor.prediction_grid_monitor import PredictionGridMonitor
from lightning_monitor.run_summary import RunSummary
from lightning_monitor.speed_monitor import SpeedMonitor
from lightning_monitor.stall_monitor import StallMonitor

__version__ = "0.1.0"

install_warning_format()  # our warnings read "lightning-monitor: <message>", without an internal file:line prefix

__all__ = ["MultiLogger", "GradientMonitor", "MemoryMonitor", "SpeedMonitor", "PredictionGridMonitor", "RunSummary",
           "HealthMonitor", "StallMonitor", "ActivationMonitor"]
