"""Examples: ``python -m idempotency_coordinator.examples.payments`` (needs the ``examples``
extra: ``pip install "idempotency-coordinator[examples]"``)."""
