"""`shadowserve verify`: the shadow pipeline offline, for CI before a deploy."""
