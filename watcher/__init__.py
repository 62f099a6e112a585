"""watcher: ship new data files to an archive with rsync and prove they arrived."""

__version__ = "0.1.0"
