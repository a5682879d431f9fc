"""`desktune eval`: held-out loss base vs tuned, forgetting, the cost of 4-bit loading, answers."""
