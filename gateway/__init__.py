"""infergate: an inference gateway and model workers speaking the PAI-EAS protocol."""

__version__ = "0.1.0"
