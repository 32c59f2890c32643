"""`python -m services.audit`: one Audit service replica."""

from services.audit.app import open_audit
from services.common.server import serve

if __name__ == "__main__":
    serve("audit", open_audit)
