"""dede_core: the DeDe backdoor-sample detector as a library (torch only, never prefect).

For training code (docs/api.md): Verdicts, webdataset_filter, KeptFiles, filter_hf_dataset read a clean run's
verdicts, so a loader skips what dede dropped. They are imported on first use: `import dede_core` stays light.
"""

__version__ = "0.1.0"

__all__ = ["Verdicts", "webdataset_filter", "KeptFiles", "filter_hf_dataset", "__version__"]


def __getattr__(name: str):
    if name in __all__:
        from dede_core import verdicts

        return getattr(verdicts, name)
    raise AttributeError(f"module 'dede_core' has no attribute {name!r}")
