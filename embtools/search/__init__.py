"""Search: exact streaming top-k, filters, Matryoshka funnel, batch similarity jobs."""
