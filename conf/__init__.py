"""YAML configs, shipped inside the package as ``fliqs.conf``: one folder per selectable group."""
