"""INI-style configuration with typed values and ${...} interpolation."""

from kvconf.config import Config
from kvconf.interpolate import InterpolationError
from kvconf.parser import ConfigError, parse

__all__ = ["Config", "ConfigError", "InterpolationError", "parse"]
