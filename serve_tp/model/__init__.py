"""GPT-2 itself: where its files come from, how it is split over ranks, its forward pass."""
