"""What runs on every tensor-parallel rank: the rank actor, scheduling, execution, sampling."""
