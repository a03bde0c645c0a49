"""Built-in selectors, the selector interface and the pure selection algorithms."""
