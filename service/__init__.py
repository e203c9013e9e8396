"""stripe-credits: credit balances kept from Stripe billing, spent through an HTTP API."""
