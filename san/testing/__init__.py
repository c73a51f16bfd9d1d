"""Support for tests and timing scripts: stand-ins for releases that cannot be downloaded here."""
