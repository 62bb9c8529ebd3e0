"""Task heads and necks for dense prediction built on the Vim backbone."""
