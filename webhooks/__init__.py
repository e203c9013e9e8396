"""POST /webhooks/stripe: verify, store in the inbox, dispatch to one handler per event type."""
