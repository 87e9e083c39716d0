"""The Discord bot (slash commands, reactions, admin); talks to engine/ through its typed API."""
