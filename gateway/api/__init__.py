"""HTTP transport only: routes turn requests into calls on the domain objects and back."""
