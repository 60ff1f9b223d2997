"""Prefect 3 flows: thin recipes over dede_core. Without PREFECT_API_URL they run with no server."""
