"""`python -m services.keys`: one Keys service replica."""

from services.common.server import serve
from services.keys.app import open_keys

if __name__ == "__main__":
    serve("keys", open_keys)
