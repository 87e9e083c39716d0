"""Plain async services the Discord handlers call; tests call them without Discord."""
