"""Job configs: one pydantic root model per job, nested by concern (see DESIGN.md).

A package rather than one module so each job's root model sits in its own file.
"""
from drivedit.config.base import ConfigError, StrictModel, flatten, load_config, validate_config  # noqa: F401
