"""Arrow batch schema and helpers: the one batch type that passes between roles."""
