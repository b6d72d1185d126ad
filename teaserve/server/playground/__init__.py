"""The playground page served at /."""
