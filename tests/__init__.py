"""The test suite: unit, HTTP-level and end to end with real parts (see README "Development")."""
