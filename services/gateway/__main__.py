"""`python -m services.gateway`: one Gateway replica."""

from services.common.server import serve
from services.gateway.app import open_gateway

if __name__ == "__main__":
    serve("gateway", open_gateway)
