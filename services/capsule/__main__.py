"""`python -m services.capsule`: one Capsule service replica."""

from services.capsule.app import open_capsule
from services.common.server import serve

if __name__ == "__main__":
    serve("capsule", open_capsule)
