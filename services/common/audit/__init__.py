"""The audit channel's emitting side: events (event.py), the JetStream recorder with its local
outbox (recorder.py, outbox.py), the `audit` interceptor (interceptor.py), settings."""
