"""CLI commands, one module each (see openmae.cli.COMMANDS)."""
