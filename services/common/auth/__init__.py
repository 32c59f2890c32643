"""Authentication and authorization shared by every service (issue #3)."""
