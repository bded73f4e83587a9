"""``make bench``: load-test the service as deployed and compare it with the in-process limit."""
