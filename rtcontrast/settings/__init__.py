"""Configuration schemas (pydantic): the node's settings and the site's protocol."""
