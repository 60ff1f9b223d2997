"""dede_core: the DeDe backdoor-sample detector as a library (torch only, never prefect)."""

__version__ = "0.1.0"
