"""stagewise: staged transfer learning on small clinical imaging cohorts."""

__version__ = "0.1.0"
