"""Command-line interface: parses flags, calls one library function, renders with rich."""
