"""Environment Service: sandboxed Docker containers per episode (queues ``env.<pool>``, CPU)."""
