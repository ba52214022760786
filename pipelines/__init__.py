"""Curation: row/batch functions for Ray Data, and the writer of the generated world."""
