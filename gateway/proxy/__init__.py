"""The gateway's data plane: a filter chain over one exchange, ending in the forwarder."""
