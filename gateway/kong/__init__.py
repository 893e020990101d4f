"""Kong compatibility: declarative config (load, validate, export) and the admin API."""
