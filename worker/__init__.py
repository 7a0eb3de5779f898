"""dms-worker: a database-centric scheduler and queue worker for the DMS job tables."""
__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy, so that `import worker` stays cheap in spawned execution processes.
    if name == "SchedulerService":
        from .service import SchedulerService
        return SchedulerService
    if name in ("Config", "ConfigError"):
        from . import config
        return getattr(config, name)
    raise AttributeError(name)


__all__ = ["Config", "ConfigError", "SchedulerService", "__version__"]
