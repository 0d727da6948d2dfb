"""The `vidsim` command's groups, one module each; scripts/cli.py puts them together."""
