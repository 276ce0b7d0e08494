"""Model Service: batched generation behind one interface (queues ``model.<name>``, GPU)."""
