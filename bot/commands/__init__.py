"""Thin Discord handlers: parse the interaction, call a service, render the reply."""
