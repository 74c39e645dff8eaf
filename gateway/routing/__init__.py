"""Where a request goes: the route table, instance choice and upstream connections."""
