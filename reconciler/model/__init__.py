"""Pure data: spec models, addresses, observed state, plans and diagnostics. No I/O here."""
