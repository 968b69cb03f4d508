"""tpfleet: tensor-parallel LLM inference engines that start reliably, run fast and live beside a trainer."""

__version__ = "0.1.0"
